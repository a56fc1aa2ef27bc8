//! Serving a Xen guest: the vTPM as tpmback's command handler.
//!
//! A TPM's PCRs reset only with its platform. A guest's platform is one life of its frontend
//! domain ([`Instance`]): a new domain (a reboot, `xl create`) gets a reset TPM; the same one
//! reconnecting keeps it. After every command the TPM's volatile state is written to a
//! [`SnapshotFile`] before the response reaches the guest, so a vtpm process that stops (or is
//! killed) under a running guest resumes that guest's TPM when it starts again. Where it cannot
//! (no snapshot, one of another instance, a damaged one), it refuses that guest: every command
//! gets the TPM's failure response until the guest's next life, or until an operator accepts
//! a reset (`--reset-running-guest`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use xvtpm_backend::{CancelProbe, CommandHandler, DeviceInfo, Request};
use xvtpm_proto::tpm::rc;
use xvtpm_xen::{DomId, ShutdownReason};

use crate::engine::{error_response, failure_rc, Canceller, TpmEngine};
use crate::snapshot::{Instance, SnapshotFile, KEY_PURPOSE};
use crate::{StateKind, TpmVersion};

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

/// How a [`VtpmHandler`] serves.
#[derive(Debug, Default)]
pub struct HandlerConfig {
    /// The highest locality the guest may claim.
    pub max_locality: u8,
    /// Where the TPM's volatile state is kept after every command. Without it, a restart
    /// under a running guest cannot resume, and refuses that guest.
    pub snapshots: Option<SnapshotFile>,
    /// The operator accepts a reset TPM for this running guest (domain id) when its TPM
    /// cannot be resumed.
    pub reset_running_guest: Option<DomId>,
    /// The guest starts its TPM itself (an HVM guest's firmware or kernel sends TPM_Startup,
    /// as on hardware); otherwise a new guest's TPM is started here (a PV guest's tpmfront
    /// never sends it).
    pub guest_starts_tpm: bool,
}

/// Whom the TPM serves.
#[derive(Debug)]
enum Serving {
    /// Nobody yet: the TPM is powered on from its permanent state, not started.
    Nobody,
    /// This guest instance.
    Guest(Instance),
    /// This guest instance is refused: its TPM could not be resumed (the reason).
    Refusing(Instance, String),
    /// The process is stopping: the last snapshot is written.
    Stopped,
}

/// Opens the vTPM's state and powers the TPM on, for a vtpm started before its state arrived
/// (an incoming live migration); `Err` says why it cannot yet.
pub type Loader = Box<dyn FnMut() -> std::result::Result<Box<dyn TpmEngine>, String> + Send>;

struct Inner {
    engine: Box<dyn TpmEngine>,
    /// Set until the state is opened (an incoming vtpm).
    loader: Option<Loader>,
    /// The first guest is a running one whatever its device says: an incoming vtpm's guest
    /// arrives from another host with its TPM in use.
    first_is_running: bool,
    serving: Serving,
    /// Whether the TPM got its Startup (or was resumed) since it was powered on.
    started: bool,
    snapshots: Option<SnapshotFile>,
    /// The hypervisor says the guest suspended (`xl save`, `xl migrate`): its snapshot is
    /// marked so, and its next domain (the restored or migrated guest) continues from it.
    /// Cleared when the same domain runs again (its next command: a checkpoint, or a suspend
    /// called off), when it shuts down for another reason or closes its frontend (its next
    /// domain starts reset), or when another domain takes the TPM.
    suspended: bool,
    reset_running_guest: Option<DomId>,
    /// No Startup sent for a new guest ([`HandlerConfig::guest_starts_tpm`]).
    guest_starts_tpm: bool,
    /// Commands refused, and snapshots that could not be written (each logged sparingly).
    refused: u64,
    snapshot_failures: u64,
}

/// The vTPM behind tpmback: one engine, commands serialized.
pub struct VtpmHandler {
    inner: Mutex<Inner>,
    running: Arc<Running>,
    /// The highest locality the guest may claim.
    max_locality: u8,
}

impl std::fmt::Debug for VtpmHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VtpmHandler").finish_non_exhaustive()
    }
}

/// The failure response a refused guest gets: TPM 2.0 `TPM_RC_FAILURE`, TPM 1.2
/// `TPM_FAILEDSELFTEST` (the TPM is in failure mode).
fn refusal(version: TpmVersion) -> Vec<u8> {
    error_response(
        version,
        match version {
            TpmVersion::V2_0 => rc::TPM2_FAILURE,
            TpmVersion::V1_2 => rc::TPM_FAILEDSELFTEST,
        },
    )
}

impl VtpmHandler {
    /// Serves `engine`, powered on by the caller (and not started: the handler sends Startup,
    /// or resumes a snapshot, when the guest connects). A watcher thread forwards a frontend's
    /// CANCEL of a long command to the engine.
    pub fn new(engine: Box<dyn TpmEngine>, config: HandlerConfig) -> Arc<Self> {
        let canceller = engine.canceller();
        Self::build(engine, None, canceller, config)
    }

    /// A handler whose state is not there yet (a live migration brings it): the device is
    /// served at once, and `loader` opens the state when the guest first connects, and again
    /// at each connection until it can. `canceller` cancels the engine's commands once there.
    pub fn incoming(version: TpmVersion, loader: Loader, canceller: Canceller, config: HandlerConfig) -> Arc<Self> {
        Self::build(Box::new(NotYet(version)), Some(loader), canceller, config)
    }

    fn build(
        engine: Box<dyn TpmEngine>,
        loader: Option<Loader>,
        canceller: Canceller,
        config: HandlerConfig,
    ) -> Arc<Self> {
        let running: Arc<Running> = Arc::default();
        let r = running.clone();
        let spawned = std::thread::Builder::new().name("vtpm-cancel".into()).spawn(move || watch(&r, &canceller));
        if let Err(e) = spawned {
            log::warn!("no cancel watcher (commands cannot be cancelled): {e}");
        }
        Arc::new(VtpmHandler {
            inner: Mutex::new(Inner {
                first_is_running: loader.is_some(),
                engine,
                loader,
                serving: Serving::Nobody,
                started: false,
                snapshots: config.snapshots,
                suspended: false,
                reset_running_guest: config.reset_running_guest,
                guest_starts_tpm: config.guest_starts_tpm,
                refused: 0,
                snapshot_failures: 0,
            }),
            running,
            max_locality: config.max_locality.min(MAX_LOCALITY - 1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Why the guest it serves is refused (its TPM could not be resumed), if it is.
    pub fn refusal(&self) -> Option<String> {
        match &self.lock().serving {
            Serving::Refusing(_, why) => Some(why.clone()),
            _ => None,
        }
    }

    /// `device`'s guest is known to be a new platform (an HVM guest's domain whose device
    /// model was started for a boot, not a restore): its TPM starts reset whatever the
    /// snapshot holds, even a suspended one of the same `vm` path (a saved guest created
    /// afresh instead of restored, or a checkpointed one rebooted).
    pub fn new_platform(&self, device: &DeviceInfo) {
        log::info!("{device}: a new platform (the guest's domain boots)");
        let instance = instance_of(device);
        let mut inner = self.lock();
        match inner.fresh(instance) {
            Ok(()) => log::info!("{device}: the TPM starts reset, as at a platform reset"),
            Err(e) => {
                log::error!("{device}: starting the TPM failed: {e}");
                inner.serving = Serving::Nobody;
            }
        }
    }

    /// A planned stop: waits for the command in progress, makes sure the guest's last state
    /// is in the snapshot, and answers nothing more. The next process resumes from it.
    pub fn stop(&self) {
        let mut inner = self.lock();
        match std::mem::replace(&mut inner.serving, Serving::Stopped) {
            // A suspended guest's mark stays: its next domain (restored after this process
            // stopped) continues from it.
            Serving::Guest(i) => {
                let suspended = inner.suspended;
                match inner.snapshot_as(&i, suspended) {
                    Some(seq) => log::info!("stopping: the TPM of {i} is kept in snapshot {seq}"),
                    None => {
                        log::error!("stopping: the TPM of {i} could not be kept; a restart will refuse that guest")
                    }
                }
            }
            Serving::Refusing(i, _) => log::info!("stopping; {i} was refused, its snapshot is left as it was"),
            Serving::Nobody | Serving::Stopped => log::info!("stopping; no guest was served"),
        }
    }
}

impl Inner {
    /// Writes the snapshot of `instance`'s TPM; its sequence number, or `None` if it could
    /// not be written (then the old one is removed: a restart refuses rather than resumes an
    /// older state).
    fn snapshot(&mut self, instance: &Instance) -> Option<u64> {
        self.snapshot_as(instance, false)
    }

    /// After a command: the snapshot keeps the suspend mark while a suspend is in progress.
    fn snapshot_after_command(&mut self, instance: &Instance) -> Option<u64> {
        let suspended = self.suspended;
        self.snapshot_as(instance, suspended)
    }

    /// [`Inner::snapshot`], marked as taken at a suspend when `suspended`.
    fn snapshot_as(&mut self, instance: &Instance, suspended: bool) -> Option<u64> {
        // Kept in memory too: without snapshots, a restore under this same process goes on.
        self.suspended = suspended;
        let snaps = self.snapshots.as_mut()?;
        let key = self.engine.derive_key(KEY_PURPOSE);
        let written = self
            .engine
            .get_state(StateKind::Volatile)
            .and_then(|v| snaps.write(key.as_ref(), self.engine.version(), instance, suspended, v));
        match written {
            Ok(seq) => Some(seq),
            Err(e) => {
                self.snapshot_failures += 1;
                let removed = snaps.remove();
                if self.snapshot_failures == 1 || self.snapshot_failures.is_power_of_two() {
                    log::error!(
                        "{instance}: the TPM's volatile state could not be kept ({e}; {} failures); {}",
                        self.snapshot_failures,
                        match removed {
                            Ok(()) => "the old snapshot is removed, so a restart refuses this guest".to_string(),
                            Err(r) => format!("and the old snapshot could not be removed either ({r})"),
                        }
                    );
                }
                None
            }
        }
    }

    /// Starts the TPM afresh for a new guest instance: as a platform reset, volatile state
    /// dropped, Startup(CLEAR).
    fn fresh(&mut self, instance: Instance) -> crate::Result<()> {
        if self.started || !self.engine.is_running() {
            self.engine.shutdown();
            self.engine.init(true)?;
        }
        self.started = true;
        if !self.guest_starts_tpm {
            crate::engine::startup_clear(self.engine.as_mut())?;
        }
        self.snapshot(&instance);
        self.serving = Serving::Guest(instance);
        Ok(())
    }

    /// Resumes `instance`'s TPM from its snapshot, or says why not.
    fn resume(&mut self, instance: &Instance) -> std::result::Result<u64, String> {
        let key = self.engine.derive_key(KEY_PURPOSE);
        let Some(snaps) = self.snapshots.as_mut() else {
            return Err("this vtpm keeps no snapshots (--snapshot-dir none)".into());
        };
        if instance.life.is_none() {
            // Domain ids repeat (after a host reboot, for a snapshot on a stub domain's disk):
            // without the domain's life a snapshot cannot be shown to be this guest's.
            return Err(format!("the life of domain {} is unknown, so no snapshot can be its own", instance.frontend));
        }
        let path = snaps.describe();
        let snap = match snaps.read(key.as_ref()) {
            Ok(Some(s)) => s,
            Ok(None) => return Err(format!("there is no snapshot ({path})")),
            Err(e) => return Err(e.to_string()),
        };
        let continued = snap.suspended && snap.instance.continued_by(instance);
        if snap.instance != *instance && !continued {
            return Err(format!("the snapshot {path} belongs to {}, not to {instance}", snap.instance));
        }
        if snap.version != self.engine.version() {
            return Err(format!("the snapshot {path} is of a {:?} TPM", snap.version));
        }
        self.engine.shutdown();
        self.started = false;
        if let Err(e) = self.engine.resume(&snap.volatile) {
            // Leave the TPM on and unstarted, as at the start.
            let _ = self.engine.init(true);
            return Err(format!("libtpms cannot resume snapshot {path}: {e}"));
        }
        self.started = true;
        self.serving = Serving::Guest(instance.clone());
        if continued {
            log::info!("{instance} continues {} (suspended at snapshot {})", snap.instance, snap.seq);
            // Bound to the new domain now: the old one's snapshot is not resumed twice.
            return Ok(self.snapshot(instance).unwrap_or(snap.seq));
        }
        self.suspended = snap.suspended;
        Ok(snap.seq)
    }

    /// With `instance`'s life unknown: whether the snapshot names its vTPM and domain id.
    fn snapshot_may_be_of(&mut self, instance: &Instance) -> bool {
        if instance.life.is_some() {
            return false;
        }
        let key = self.engine.derive_key(KEY_PURPOSE);
        let Some(snaps) = self.snapshots.as_mut() else { return false };
        matches!(snaps.read(key.as_ref()), Ok(Some(s)) if s.instance.uuid == instance.uuid && s.instance.frontend == instance.frontend)
    }

    /// The hypervisor says `instance` suspended (`xl save`, `xl migrate`): its state now is
    /// what its next domain continues from. Told again at every domain's shutdown while it
    /// stays suspended: nothing changed since.
    fn suspending(&mut self, instance: &Instance) {
        match &self.serving {
            Serving::Guest(i) if i == instance && !self.suspended => match self.snapshot_as(instance, true) {
                Some(seq) => {
                    log::info!("{instance} is being suspended: its TPM is kept in snapshot {seq} for its next domain")
                }
                None => log::warn!(
                    "{instance} is being suspended; its TPM is kept only in this process (no snapshot) for its next domain"
                ),
            },
            _ => {}
        }
    }

    /// The first guest this process serves: resume it, start afresh for a new guest, or refuse
    /// a running guest whose TPM cannot be resumed.
    fn first_guest(&mut self, device: &DeviceInfo, instance: Instance) {
        let why = match self.resume(&instance) {
            Ok(seq) => {
                log::info!(
                    "{device}: the TPM of the running guest, {instance}, is resumed from snapshot {seq}; PCRs as they were"
                );
                return;
            }
            Err(why) => why,
        };
        // A guest that was not connected when we started may be a new life whose snapshot
        // names an older one, or the first guest ever: a new platform either way. Unless its
        // life is unknown and the snapshot names its domain id: then it may be that guest,
        // running (a vTPM domain made again under it, dom0 not telling lives).
        let running_guest = device.adopted || self.first_is_running || self.snapshot_may_be_of(&instance);
        if running_guest && self.reset_running_guest != Some(device.frontend) {
            log::error!(
                "{device}: the running guest's TPM cannot be resumed: {why}. Every command of {instance} is \
                 answered with the TPM's failure response until the guest reboots (a new domain gets a reset \
                 TPM), or an operator accepts a reset of its PCRs by restarting this vtpm with \
                 --reset-running-guest {}",
                device.frontend
            );
            self.serving = Serving::Refusing(instance, why);
            return;
        }
        let reason = if running_guest {
            format!("the operator accepted a reset of the running guest's TPM (--reset-running-guest); {why}")
        } else {
            format!("a new guest ({why})")
        };
        match self.fresh(instance) {
            Ok(()) => log::warn!("{device}: the TPM starts reset: {reason}"),
            Err(e) => {
                log::error!("{device}: starting the TPM failed: {e}");
                self.serving = Serving::Nobody;
            }
        }
    }
}

/// The engine of an incoming vtpm until its state is opened: every operation fails.
#[derive(Debug)]
struct NotYet(TpmVersion);

fn not_yet<T>() -> crate::Result<T> {
    Err(crate::Error::PowerState("not loaded yet (incoming)"))
}

impl TpmEngine for NotYet {
    fn version(&self) -> TpmVersion {
        self.0
    }
    fn init(&mut self, _: bool) -> crate::Result<()> {
        not_yet()
    }
    fn resume(&mut self, _: &[u8]) -> crate::Result<()> {
        not_yet()
    }
    fn shutdown(&mut self) {}
    fn is_running(&self) -> bool {
        false
    }
    fn process(&mut self, _: u8, _: &[u8]) -> crate::Result<Vec<u8>> {
        not_yet()
    }
    fn canceller(&self) -> Canceller {
        Arc::new(|| {})
    }
    fn store_volatile(&mut self) -> crate::Result<()> {
        not_yet()
    }
    fn get_state(&mut self, _: StateKind) -> crate::Result<Vec<u8>> {
        not_yet()
    }
    fn set_state(&mut self, _: StateKind, _: &[u8]) -> crate::Result<()> {
        not_yet()
    }
    fn set_buffer_size(&mut self, _: u32) -> crate::Result<(u32, u32, u32)> {
        not_yet()
    }
    fn established(&mut self) -> crate::Result<bool> {
        not_yet()
    }
    fn reset_established(&mut self, _: u8) -> crate::Result<()> {
        not_yet()
    }
    fn hash_start(&mut self) -> crate::Result<()> {
        not_yet()
    }
    fn hash_data(&mut self, _: &[u8]) -> crate::Result<()> {
        not_yet()
    }
    fn hash_end(&mut self) -> crate::Result<()> {
        not_yet()
    }
}

/// The command in progress, for the cancel watcher: it looks at the guest's page only while
/// one runs, and sleeps on `changed` otherwise (an idle vtpm never wakes).
#[derive(Default)]
struct Running {
    slot: Mutex<RunningSlot>,
    changed: Condvar,
}

#[derive(Default)]
struct RunningSlot {
    probe: Option<CancelProbe>,
    /// The handler is gone: the watcher ends.
    closed: bool,
}

impl Running {
    fn lock(&self) -> MutexGuard<'_, RunningSlot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, probe: Option<CancelProbe>) {
        self.lock().probe = probe;
        self.changed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

fn watch(running: &Running, cancel: &Canceller) {
    let mut slot = running.lock();
    while !slot.closed {
        let cancelled = match &slot.probe {
            None => {
                slot = running.changed.wait(slot).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            Some(p) => p.is_cancelled(),
        };
        if cancelled {
            drop(slot);
            cancel();
            slot = running.lock();
        }
        slot = running.changed.wait_timeout(slot, CANCEL_POLL).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// The command in progress, as the cancel watcher sees it; cleared when dropped, also by a
/// panic in the engine (else the watcher would poll a finished command's page forever).
struct RunningCommand<'a>(&'a Running);

impl<'a> RunningCommand<'a> {
    fn start(running: &'a Running, probe: CancelProbe) -> Self {
        running.set(Some(probe));
        RunningCommand(running)
    }
}

impl Drop for RunningCommand<'_> {
    fn drop(&mut self) {
        self.0.set(None);
    }
}

impl Drop for VtpmHandler {
    fn drop(&mut self) {
        self.running.close();
    }
}

fn instance_of(device: &DeviceInfo) -> Instance {
    Instance { uuid: device.uuid.clone(), frontend: device.frontend, life: device.life.clone() }
}

impl CommandHandler for VtpmHandler {
    fn handle(&self, req: &Request<'_>) -> Vec<u8> {
        let mut inner = self.lock();
        let version = inner.engine.version();
        if req.locality > self.max_locality {
            log::warn!(
                "{}: command at locality {} refused (this device allows up to {})",
                req.device,
                req.locality,
                self.max_locality
            );
            let rc = match version {
                // TPM_RC_LOCALITY; TPM_BAD_LOCALITY.
                TpmVersion::V2_0 => 0x907,
                TpmVersion::V1_2 => 0x3D,
            };
            return error_response(version, rc);
        }
        let instance = match &inner.serving {
            Serving::Guest(i) => i.clone(),
            Serving::Refusing(_, why) => {
                let why = why.clone();
                inner.refused += 1;
                let n = inner.refused;
                if n == 1 || n.is_power_of_two() {
                    log::warn!("{}: command refused ({n} so far): {why}", req.device);
                }
                return refusal(version);
            }
            Serving::Nobody | Serving::Stopped => return error_response(version, failure_rc(version)),
        };
        if inner.suspended {
            // A suspended domain runs nothing: this one was resumed in place. Its TPM goes on
            // here, and no longer waits for a next domain.
            let seq = inner.snapshot(&instance);
            log::info!("{}: the guest runs again after its suspend (a checkpoint, or a suspend called off): no longer suspended ({seq:?})", req.device);
        }
        let running = RunningCommand::start(&self.running, req.cancel_probe());
        // The stock Linux guest kernel speaks TPM 1.2 to its xen-tpmfront chip on its own.
        let probe = match version {
            TpmVersion::V2_0 => crate::linux_probe::answer(inner.engine.as_mut(), req.command),
            TpmVersion::V1_2 => None,
        };
        let answered_by_probe = probe.is_some();
        let result = match probe {
            Some(r) => Ok(r),
            None => inner.engine.process(req.locality, req.command),
        };
        drop(running);
        // Kept before the guest sees the response: a restart after it resumes from here.
        if !answered_by_probe {
            inner.snapshot_after_command(&instance);
        }
        match result {
            Ok(rsp) => rsp,
            Err(e) => {
                log::error!("{}: command failed: {e}", req.device);
                error_response(version, failure_rc(version))
            }
        }
    }

    fn follows_suspends(&self) -> bool {
        true
    }

    fn domain_shut_down(&self, device: &DeviceInfo, reason: ShutdownReason) {
        let mut inner = self.lock();
        let instance = instance_of(device);
        if reason == ShutdownReason::Suspend {
            inner.suspending(&instance);
        } else if inner.suspended && matches!(&inner.serving, Serving::Guest(i) if *i == instance) {
            // Resumed in place after a suspend, then stopped for good before a command: its
            // next domain is a new platform.
            let seq = inner.snapshot(&instance);
            log::info!(
                "{device}: the guest's domain shut down ({reason}) after a suspend: no longer suspended ({seq:?})"
            );
        }
    }

    fn frontend_closed(&self, device: &DeviceInfo) {
        let mut inner = self.lock();
        let instance = instance_of(device);
        if inner.suspended && matches!(&inner.serving, Serving::Guest(i) if *i == instance) {
            // Not suspended after all: it shuts down or reboots, so its next domain is a new
            // platform.
            let seq = inner.snapshot(&instance);
            log::info!("{device}: the guest closed its TPM after a suspend: no longer suspended ({seq:?})");
        }
    }

    fn connected(&self, device: &DeviceInfo) {
        log::info!(
            "{device}: guest connected{}",
            if device.adopted { " (it was connected before this process)" } else { "" }
        );
        let instance = instance_of(device);
        let mut inner = self.lock();
        if let Some(load) = inner.loader.as_mut() {
            match load() {
                Ok(engine) => {
                    log::info!("{device}: the vTPM's state is opened");
                    inner.engine = engine;
                    inner.loader = None;
                    inner.serving = Serving::Nobody;
                }
                Err(why) => {
                    log::error!(
                        "{device}: the vTPM's state cannot be opened yet ({why}); {instance} is refused until it can"
                    );
                    inner.serving = Serving::Refusing(instance, format!("the vTPM's state is not here yet: {why}"));
                    return;
                }
            }
        }
        let learnt = match &inner.serving {
            Serving::Guest(i) | Serving::Refusing(i, _) => *i != instance && i.same_domain_life_unknown(&instance),
            _ => false,
        };
        if learnt {
            // Its life known now (or no longer told): the same domain, which keeps its TPM (or
            // stays refused); a known life is kept.
            if let Serving::Guest(i) | Serving::Refusing(i, _) = &mut inner.serving {
                if i.life.is_none() {
                    *i = instance.clone();
                }
                log::info!("{device}: {i} connects again");
            }
            if let Serving::Guest(i) = &inner.serving {
                // Bound to the life now known; a suspend mark stays as it was.
                let (i, suspended) = (i.clone(), inner.suspended);
                inner.snapshot_as(&i, suspended);
            }
            return;
        }
        match &inner.serving {
            // The same life reconnecting (its tpmfront closed and opened again) keeps its TPM,
            // or stays refused.
            Serving::Guest(i) | Serving::Refusing(i, _) if *i == instance => {}
            Serving::Stopped => {}
            Serving::Nobody => inner.first_guest(device, instance),
            // The guest saved or migrated and restored in a new domain: its TPM goes on.
            Serving::Guest(old) if inner.suspended && old.continued_by(&instance) => {
                let old = old.clone();
                inner.serving = Serving::Guest(instance.clone());
                let seq = inner.snapshot(&instance);
                log::info!(
                    "{device}: {instance} continues {old} after its suspend: its TPM goes on (snapshot {seq:?})"
                );
            }
            Serving::Guest(old) | Serving::Refusing(old, _) => {
                // Another life is another guest: a rebooted or recreated one gets a new domain.
                // A hardware TPM resets with its platform, so this one resets for the new guest.
                let old = old.to_string();
                match inner.fresh(instance) {
                    Ok(()) => log::info!(
                        "{device}: a new guest ({}, the last one was {old}): the TPM is reset, as a platform reset would",
                        device.frontend
                    ),
                    Err(e) => {
                        log::error!("{device}: a new guest, but resetting the TPM failed: {e}");
                        inner.serving = Serving::Nobody;
                    }
                }
            }
        }
    }

    fn disconnected(&self, device: &DeviceInfo) {
        log::info!("{device}: guest disconnected");
    }
}
