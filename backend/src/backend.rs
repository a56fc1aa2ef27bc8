//! The xenstore side of tpmback: device discovery and the xenbus state machine.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use xvtpm_xen::xenbus::{self, parse_num, parse_uuid, vtpm_backend_root, GUEST_DOMAIN_KEY, GUEST_LIFE_KEY};
use xvtpm_xen::xenstore::Waker;
use xvtpm_xen::{DomId, GrantMapper, ShutdownReason, TxId, Xen, XenbusState, Xenstore};

use crate::handler::{CommandHandler, DeviceInfo};
use crate::machine::{self, Action, Frontend, View};
use crate::pool::{Dispatcher, WORKERS};
use crate::worker::{Connection, Fatal, FatalTx, Worker};
use crate::{Error, Result};

/// Which devices of the domain this backend serves. Several backends may run in one domain
/// (one vtpm process per guest); each ignores the devices that are not its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceFilter {
    /// Every device.
    All,
    /// The device of frontend domain `frontend` with handle `handle`.
    Device {
        /// Frontend domain id.
        frontend: DomId,
        /// Device handle.
        handle: u32,
    },
    /// The device whose `uuid` is this (case-insensitive).
    Uuid(String),
}

/// How a backend runs.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Devices to serve.
    pub filter: DeviceFilter,
    /// A backend that may not read its frontend domain's `vm` path (one in a domain of its
    /// own) takes the domain's life from the device's [`GUEST_LIFE_KEY`], which dom0's
    /// `xvtpmd` writes: a connection waits this long for it to appear (zero: not at all).
    pub guest_life_wait: Duration,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig { filter: DeviceFilter::All, guest_life_wait: Duration::ZERO }
    }
}

impl BackendConfig {
    /// Serving `filter`'s devices, with the defaults otherwise.
    pub fn serving(filter: DeviceFilter) -> Self {
        BackendConfig { filter, ..Self::default() }
    }
}

/// tpmback. [`Backend::run`] serves until told to stop.
pub struct Backend {
    xen: Arc<dyn Xen>,
    handler: Arc<dyn CommandHandler>,
    config: BackendConfig,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("xen", &self.xen).field("config", &self.config).finish()
    }
}

/// Tells a running [`Backend::run`] to stop: a flag, and a wake-up for its loop, which waits
/// for xenstore events without a timeout (an idle backend never wakes).
#[derive(Debug, Default)]
pub struct StopSignal {
    flag: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl StopSignal {
    /// Asks the backend to stop; it does so at once, even while it waits.
    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(w) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            w.wake();
        }
    }

    /// Whether [`StopSignal::set`] was called.
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The loop checks the flag after this and before every wait, so a set() at any time is seen.
    fn attach(&self, w: Waker) {
        *self.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(w);
    }
}

/// A backend running on its own thread; dropping it (or [`BackendHandle::stop`]) stops it.
#[derive(Debug)]
pub struct BackendHandle {
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl BackendHandle {
    /// Stops the backend and returns how its loop ended.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        self.stop.set();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| Error::Thread("backend thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            log::error!("backend ended with an error: {e}");
        }
    }
}

const ROOT_TOKEN: &str = "vtpm-backend";
/// A backend of every device of its domain watches all frontends with one watch on this path
/// (xenstored tells a domain only of nodes it may read: its frontends' device directories),
/// not one per device: an unprivileged domain may hold 128 watches.
const FRONTENDS: &str = "/local/domain";
const FRONTENDS_TOKEN: &str = "vtpm-frontends";
/// xenstored fires this when a domain shuts down (suspends included) or goes: then the
/// hypervisor says why (what the guest told Xen, which no xenstore node can fake).
const RELEASE: &str = "@releaseDomain";
const RELEASE_TOKEN: &str = "vtpm-release";
/// In a driver domain, how long an offline device's Closed stays visible before we remove its
/// directory, unless the toolstack shows sooner that it saw Closed. libxl in dom0 reads the
/// state when its watch fires; a directory removed before that is an error to it ("unable to
/// remove device"). It waits 10 s for the removal.
const REMOVAL_GRACE: Duration = Duration::from_secs(1);

impl Backend {
    /// A backend on `xen` handing commands to `handler`.
    pub fn new(xen: Arc<dyn Xen>, handler: Arc<dyn CommandHandler>, config: BackendConfig) -> Self {
        Backend { xen, handler, config }
    }

    /// Runs [`Backend::run`] on a new thread. Returns once the backend watches xenstore, so a
    /// toolstack may create devices right after.
    pub fn spawn(self) -> Result<BackendHandle> {
        let stop = Arc::new(StopSignal::default());
        let s = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vtpm-backend".into())
            .spawn(move || self.run_with_ready(&s, Some(ready_tx)))
            .map_err(|e| Error::Thread(e.to_string()))?;
        let mut handle = BackendHandle { stop, thread: Some(thread) };
        match ready_rx.recv() {
            Ok(()) => Ok(handle),
            // The loop ended before it was ready: report why.
            Err(_) => Err(handle.stop_inner().err().unwrap_or_else(|| Error::Thread("backend ended at start".into()))),
        }
    }

    /// Serves devices until `stop` is set. Connections are dropped without touching xenstore
    /// state, so a restarted backend picks the devices up again and running guests keep
    /// their TPM.
    pub fn run(&self, stop: &StopSignal) -> Result<()> {
        self.run_with_ready(stop, None)
    }

    fn run_with_ready(&self, stop: &StopSignal, ready: Option<Sender<()>>) -> Result<()> {
        let xs = self.xen.xenstore()?;
        stop.attach(xs.waker());
        let mapper: Arc<dyn GrantMapper> = Arc::from(self.xen.grant_mapper()?);
        let root = vtpm_backend_root(self.xen.domid());
        let (fatal_tx, fatal_rx) = mpsc::channel();
        let mut st = State {
            xen: self.xen.clone(),
            xs: xs.clone(),
            mapper,
            handler: self.handler.clone(),
            filter: self.config.filter.clone(),
            root: root.clone(),
            devices: HashMap::new(),
            offline: HashMap::new(),
            fatal_tx: FatalTx::new(fatal_tx, xs.waker()),
            next_generation: 1,
            dispatcher: None,
            frontends: (self.config.filter == DeviceFilter::All).then(HashMap::new),
            follows_domains: false,
            dom0_notes: false,
            guest_life_wait: self.config.guest_life_wait,
        };
        xs.watch(&root, ROOT_TOKEN)?;
        if st.frontends.is_some() {
            xs.watch(FRONTENDS, FRONTENDS_TOKEN)?;
        }
        if self.handler.follows_suspends() {
            if st.may_ask_about_domains() {
                st.follows_domains = xs.watch(RELEASE, RELEASE_TOKEN).is_ok();
            } else if !st.guest_life_wait.is_zero() {
                // Told by dom0's xvtpmd in each device's directory, which the root watch covers.
                log::info!("guests' suspends are followed through what dom0's xvtpmd writes ({GUEST_DOMAIN_KEY})");
                (st.follows_domains, st.dom0_notes) = (true, true);
            } else {
                log::warn!(
                    "this domain cannot ask Xen about other domains: guests' suspends are not followed, so a \
                     saved and restored guest gets a reset TPM"
                );
            }
        }
        log::info!("tpmback: domain {} watching {root}", self.xen.domid());
        if let Some(r) = ready {
            let _ = r.send(());
        }
        let result = st.event_loop(stop, &fatal_rx);
        st.shutdown();
        let _ = xs.unwatch(&root, ROOT_TOKEN);
        if st.frontends.is_some() {
            let _ = xs.unwatch(FRONTENDS, FRONTENDS_TOKEN);
        }
        if st.follows_domains {
            let _ = xs.unwatch(RELEASE, RELEASE_TOKEN);
        }
        result
    }
}

struct Device {
    info: Option<DeviceInfo>,
    be_path: String,
    fe_path: String,
    watching_fe: bool,
    /// The last state we wrote.
    written: Option<XenbusState>,
    /// We closed the device for a protocol error: the frontend must close (or start over)
    /// before it may connect again. A frontend that closes on its own needs no such step.
    error_closed: bool,
    conn: Option<Connection>,
    generation: u64,
    /// Found Connected by an earlier backend process, and not reconnected since.
    adopted_connected: bool,
    /// What the hypervisor last said the connected frontend domain shut down for (logged
    /// when it changes).
    shutdown_seen: Option<ShutdownReason>,
    /// The device as its connection was made (with the frontend domain's life).
    connected_info: Option<DeviceInfo>,
}

struct State {
    xen: Arc<dyn Xen>,
    xs: Xenstore,
    mapper: Arc<dyn GrantMapper>,
    handler: Arc<dyn CommandHandler>,
    filter: DeviceFilter,
    root: String,
    devices: HashMap<(DomId, u32), Device>,
    /// Driver domain only: offline devices waiting for their directory's removal, with when
    /// we saw them offline and whether the frontend's directory was there then.
    offline: HashMap<(DomId, u32), (std::time::Instant, bool)>,
    fatal_tx: FatalTx,
    next_generation: u64,
    /// Serves the connected devices (made at the first connection).
    dispatcher: Option<Arc<Dispatcher>>,
    /// With the one watch on [`FRONTENDS`]: per frontend domain, each device's frontend
    /// directory to its handle. `None`: a watch per device.
    frontends: Option<HashMap<DomId, HashMap<String, u32>>>,
    /// Watching `@releaseDomain` and asking the hypervisor why a frontend domain shut down,
    /// for a handler that [`CommandHandler::follows_suspends`].
    follows_domains: bool,
    /// The hypervisor's word on frontend domains comes from dom0's xvtpmd, in each device's
    /// [`GUEST_DOMAIN_KEY`] (a backend in a domain that may not ask Xen itself).
    dom0_notes: bool,
    /// [`BackendConfig::guest_life_wait`].
    guest_life_wait: Duration,
}

fn fe_token(key: (DomId, u32)) -> String {
    format!("vtpm-fe/{}/{}", key.0, key.1)
}

impl State {
    fn event_loop(&mut self, stop: &StopSignal, fatal_rx: &Receiver<Fatal>) -> Result<()> {
        while !stop.is_set() {
            while let Ok(f) = fatal_rx.try_recv() {
                self.on_fatal(f);
            }
            self.remove_due_offline();
            // No timeout unless a removal is due: device threads and stop requests wake us.
            let Some(first) = self.xs.next_event(self.next_removal_in())? else { continue };
            // Reconcile reads the current state, so a burst of events (a flapping frontend,
            // many devices at once) needs one pass per device, not one per event.
            let mut keys = Vec::new();
            let mut noted = Vec::new();
            let mut rescan = false;
            let mut ev = Some(first);
            while let Some(e) = ev {
                if e.token == ROOT_TOKEN {
                    match self.key_of(&e.path) {
                        Some(key) => {
                            if self.dom0_notes && e.path.ends_with(&format!("/{GUEST_DOMAIN_KEY}")) {
                                noted.push(key);
                            }
                            keys.push(key);
                        }
                        None => rescan = true,
                    }
                } else if e.token == FRONTENDS_TOKEN {
                    self.frontend_event(&e.path, &mut keys);
                } else if let Some(key) = parse_fe_token(&e.token) {
                    keys.push(key);
                } else if e.token == RELEASE_TOKEN {
                    // At once, before this batch's reconciles: the mapped ring keeps the old
                    // domain (and its shutdown reason) there until the device disconnects.
                    self.domains_changed();
                }
                ev = self.xs.next_event(Some(Duration::ZERO))?;
            }
            // As a `@releaseDomain` in dom0: before this batch's reconciles.
            noted.sort_unstable();
            noted.dedup();
            for key in noted {
                self.check_domain(key);
            }
            if rescan {
                self.scan();
            }
            keys.sort_unstable();
            keys.dedup();
            for key in keys {
                self.reconcile(key);
            }
        }
        Ok(())
    }

    /// The devices a change under [`FRONTENDS`] concerns: the one whose frontend `state` it
    /// is, or, for the removal of a directory above frontends, each device below it.
    /// Cheap for the events of other domains (a privileged backend sees every write).
    fn frontend_event(&self, path: &str, keys: &mut Vec<(DomId, u32)>) {
        let Some(index) = &self.frontends else { return };
        // `/local/domain/<fe>/...`: only the devices of domain `fe` can be concerned.
        let fe = path.strip_prefix(FRONTENDS).and_then(|r| r.strip_prefix('/')).and_then(|r| r.split('/').next());
        let Some((fe, devices)) = fe.and_then(|d| d.parse::<DomId>().ok()).and_then(|d| Some((d, index.get(&d)?)))
        else {
            return;
        };
        if let Some(handle) = path.strip_suffix("/state").and_then(|dir| devices.get(dir)) {
            keys.push((fe, *handle));
            return;
        }
        // A removal: xenstored reports only the top of what it removed (the device's
        // directory itself when the toolstack removes it), so a directory at or above a
        // device's concerns that device.
        let at_or_below =
            |fe_path: &String| fe_path.strip_prefix(path).is_some_and(|r| r.is_empty() || r.starts_with('/'));
        keys.extend(devices.iter().filter(|(p, _)| at_or_below(p)).map(|(_, h)| (fe, *h)));
    }

    /// `<root>/<fe>/<handle>[/...]` -> (fe, handle).
    fn key_of(&self, path: &str) -> Option<(DomId, u32)> {
        let rest = path.strip_prefix(&self.root)?.strip_prefix('/')?;
        let mut parts = rest.split('/');
        let fe = parts.next()?.parse().ok()?;
        let handle = parts.next()?.parse().ok()?;
        Some((fe, handle))
    }

    /// Looks at every device under the root: new ones appear, removed ones go.
    fn scan(&mut self) {
        let mut present = Vec::new();
        let fes = self.xs.directory(TxId::NONE, &self.root).unwrap_or_default();
        for fe in fes {
            let Ok(fe_id) = fe.parse::<DomId>() else { continue };
            for h in self.xs.directory(TxId::NONE, &format!("{}/{fe}", self.root)).unwrap_or_default() {
                if let Ok(handle) = h.parse::<u32>() {
                    present.push((fe_id, handle));
                }
            }
        }
        let gone: Vec<_> = self.devices.keys().filter(|k| !present.contains(k)).copied().collect();
        for key in gone.into_iter().chain(present) {
            self.reconcile(key);
        }
    }

    fn wanted(&self, key: (DomId, u32), uuid: Option<&str>) -> bool {
        match &self.filter {
            DeviceFilter::All => true,
            DeviceFilter::Device { frontend, handle } => key == (*frontend, *handle),
            DeviceFilter::Uuid(u) => uuid.is_some_and(|x| x.eq_ignore_ascii_case(u)),
        }
    }

    /// Writes keys of a device's backend directory, state last, in one transaction that
    /// does nothing if the toolstack has removed the directory meanwhile (a plain write would
    /// recreate it), like Linux's `xenbus_switch_state`.
    fn write_keys(&mut self, key: (DomId, u32), keys: &[(&str, &[u8])], state: Option<XenbusState>) {
        let Some(dev) = self.devices.get_mut(&key) else { return };
        let be = dev.be_path.clone();
        let xs = &self.xs;
        let written = xs.transaction(|tx| {
            if xs.try_read(tx, &format!("{be}/state"))?.is_none() {
                return Ok(false);
            }
            for (k, v) in keys {
                xs.write(tx, &format!("{be}/{k}"), v)?;
            }
            if let Some(s) = state {
                xs.write(tx, &format!("{be}/state"), s.as_str().as_bytes())?;
            }
            Ok(true)
        });
        match written {
            Ok(true) if state.is_some() => dev.written = state,
            Ok(_) => {}
            Err(e) => log::warn!("vtpm {}/{}: cannot write {be}: {e}", key.0, key.1),
        }
    }

    fn write_state(&mut self, key: (DomId, u32), state: XenbusState) {
        self.write_keys(key, &[], Some(state));
    }

    fn disconnect(&mut self, key: (DomId, u32)) {
        if let Some(conn) = self.devices.get_mut(&key).and_then(|d| d.conn.take()) {
            conn.stop();
            log::info!("vtpm {}/{}: disconnected", key.0, key.1);
            if self.follows_domains {
                self.disconnected_while_running(key);
            }
        }
    }

    /// A running guest let go of its device (whatever state it wrote: its root may write any,
    /// or remove its frontend directory): whatever it does next, it was not suspended, so the
    /// handler hears it as a close. A suspended or dying domain's device goes without that.
    fn disconnected_while_running(&mut self, key: (DomId, u32)) {
        let Some(info) = self.devices.get(&key).and_then(|d| d.connected_info.clone()) else { return };
        if self.domain_of(key).is_some_and(|d| d.shutdown.is_none() && !d.dying) {
            self.handler.frontend_closed(&info);
        }
    }

    /// What Xen says of `key`'s frontend domain; `None` if it is gone or Xen cannot say
    /// (logged).
    fn domain_of(&self, key: (DomId, u32)) -> Option<xvtpm_xen::DomainInfo> {
        if self.dom0_notes {
            let path = format!("{}/{GUEST_DOMAIN_KEY}", self.devices.get(&key)?.be_path);
            let raw = self.xs.try_read(TxId::NONE, &path).ok().flatten()?;
            return match parse_num::<u32>(&path, &raw) {
                Ok(flags) => Some(xvtpm_xen::DomainInfo::from_flags(flags)),
                Err(e) => {
                    log::warn!("vtpm {}/{}: {e}", key.0, key.1);
                    None
                }
            };
        }
        self.xen.domain_info(key.0).unwrap_or_else(|e| {
            log::warn!("vtpm {}/{}: cannot ask Xen about domain {}: {e}", key.0, key.1, key.0);
            None
        })
    }

    /// The device broke the protocol: close it, say why where the toolstack can see it.
    fn close_with_error(&mut self, key: (DomId, u32), reason: &str) {
        log::error!("vtpm {}/{}: {reason}; closing the device", key.0, key.1);
        self.disconnect(key);
        if let Some(d) = self.devices.get_mut(&key) {
            d.error_closed = true;
        }
        self.write_keys(key, &[("error", reason.as_bytes())], Some(XenbusState::Closing));
    }

    fn on_fatal(&mut self, f: Fatal) {
        let current = self.devices.get(&f.key).is_some_and(|d| d.conn.is_some() && d.generation == f.generation);
        if current {
            self.close_with_error(f.key, &f.reason);
        }
    }

    fn forget(&mut self, key: (DomId, u32)) {
        self.offline.remove(&key);
        self.disconnect(key);
        if let Some(dev) = self.devices.remove(&key) {
            if let Some(index) = self.frontends.as_mut() {
                if let Some(devices) = index.get_mut(&key.0) {
                    // Only its own entry: a misconfigured device may name another's frontend.
                    if devices.get(&dev.fe_path) == Some(&key.1) {
                        devices.remove(&dev.fe_path);
                    }
                    if devices.is_empty() {
                        index.remove(&key.0);
                    }
                }
            }
            if dev.watching_fe {
                let _ = self.xs.unwatch(&format!("{}/state", dev.fe_path), &fe_token(key));
            }
            log::info!("vtpm {}/{}: device removed", key.0, key.1);
        }
    }

    /// Whether the frontend's directory of `key` is there. Once libxl removed it, xenstored
    /// answers EACCES rather than ENOENT, since we may not read the guest's parent directories.
    fn frontend_present(&self, key: (DomId, u32)) -> bool {
        let Some(d) = self.devices.get(&key) else { return false };
        match self.xs.try_read(TxId::NONE, &format!("{}/state", d.fe_path)) {
            Ok(None) => false,
            Err(e) if e.xs_errno() == Some(xvtpm_xen::XsErrno::EACCES) => false,
            _ => true,
        }
    }

    /// In a driver domain (not dom0), removing an offline device's backend directory is ours
    /// to do, as `xl devd` does: libxl in dom0 writes online=0 and Closing, waits for Closed,
    /// then waits (10 s) for the directory to go. `xl destroy` removes the frontend's directory
    /// first; `xl vtpm-detach` only after; our own tool right after it saw Closed. So a
    /// frontend that was there when the device went offline and is gone now means the
    /// toolstack saw Closed: remove at once. Otherwise remove after [`REMOVAL_GRACE`].
    fn note_offline(&mut self, key: (DomId, u32), be_path: &str) {
        let present = self.frontend_present(key);
        let (_, was_present) = *self.offline.entry(key).or_insert((std::time::Instant::now(), present));
        if was_present && !present {
            self.remove_offline(key, be_path);
        }
    }

    /// How long until the first offline device's grace is over.
    fn next_removal_in(&self) -> Option<Duration> {
        self.offline.values().map(|(since, _)| REMOVAL_GRACE.saturating_sub(since.elapsed())).min()
    }

    /// Removes the offline devices whose grace is over.
    fn remove_due_offline(&mut self) {
        let due: Vec<(DomId, u32)> =
            self.offline.iter().filter(|(_, (since, _))| since.elapsed() >= REMOVAL_GRACE).map(|(k, _)| *k).collect();
        for key in due {
            let be_path = xenbus::vtpm_backend_path(self.xen.domid(), key.0, key.1);
            // Still offline and Closed? (A toolstack may have removed it already, or, in
            // theory, brought it back.)
            let online = self.read_opt(&format!("{be_path}/online")).is_none_or(|v| v != b"0");
            let state = self.read_opt(&format!("{be_path}/state"));
            match state {
                None => self.forget(key),
                Some(raw) if online || XenbusState::parse(&be_path, &raw).ok() != Some(XenbusState::Closed) => {
                    self.offline.remove(&key);
                }
                Some(_) => self.remove_offline(key, &be_path),
            }
        }
    }

    fn remove_offline(&mut self, key: (DomId, u32), be_path: &str) {
        // libxl also removes the guest's directory here once it is empty (one removal does
        // both), where the permissions let us; the device's own directory is ours.
        let parent = match be_path.rsplit_once('/') {
            Some((dir, h)) if self.xs.directory(TxId::NONE, dir).is_ok_and(|e| e == [h]) => Some(dir),
            _ => None,
        };
        let removed = parent.is_some_and(|dir| self.xs.rm(TxId::NONE, dir).is_ok());
        if !removed {
            if let Err(e) = self.xs.try_rm(TxId::NONE, be_path) {
                log::warn!("vtpm {}/{}: cannot remove {be_path}: {e}", key.0, key.1);
                self.offline.remove(&key);
                return;
            }
        }
        self.forget(key);
    }

    /// Reads a node: `Ok(None)` if it does not exist, `Err` (logged) if xenstore failed, so
    /// that a transient error is never taken for a removed device.
    fn read_node(&self, path: &str) -> std::result::Result<Option<Vec<u8>>, ()> {
        self.xs.try_read(TxId::NONE, path).map_err(|e| log::warn!("cannot read {path}: {e}"))
    }

    fn read_opt(&self, path: &str) -> Option<Vec<u8>> {
        self.read_node(path).ok().flatten()
    }

    /// Brings one device in line with what xenstore says.
    fn reconcile(&mut self, key: (DomId, u32)) {
        let (fe, handle) = key;
        let be_path = xenbus::vtpm_backend_path(self.xen.domid(), fe, handle);
        let raw_state = match self.read_node(&format!("{be_path}/state")) {
            Ok(Some(v)) => v,
            Ok(None) => {
                // The toolstack removed the device.
                self.forget(key);
                return;
            }
            Err(()) => return,
        };
        if !self.devices.contains_key(&key) && !self.adopt(key, &be_path) {
            return;
        }
        let Some(dev) = self.devices.get(&key) else { return };
        let (written, fe_path, configured, error_closed) =
            (dev.written, dev.fe_path.clone(), dev.info.is_some(), dev.error_closed);
        let mut view = View {
            configured,
            backend: XenbusState::parse(&be_path, &raw_state).ok(),
            online: !configured || self.read_opt(&format!("{be_path}/online")).is_none_or(|v| v != b"0"),
            frontend: Frontend::Gone,
            written,
            error_closed,
            driver_domain: self.xen.domid() != 0,
        };
        // Read only when it decides something: a misconfigured device's frontend path is not
        // to be trusted, and an offline device's frontend may be gone (EACCES, each time).
        if machine::needs_frontend(&view) {
            let fe_state_path = format!("{fe_path}/state");
            view.frontend = match self.read_opt(&fe_state_path) {
                None => Frontend::Gone,
                Some(raw) => match XenbusState::parse(&fe_state_path, &raw) {
                    Ok(s) => Frontend::Is(s),
                    Err(e) => {
                        log::warn!("vtpm {fe}/{handle}: {e}");
                        Frontend::Garbage
                    }
                },
            };
        }
        // A guest shutting down or rebooting closes its frontend first (Linux's xenbus does, a
        // suspended one does not): the handler hears of it before the connection goes.
        let closing = matches!(view.frontend, Frontend::Is(XenbusState::Closing | XenbusState::Closed));
        if closing {
            if let Some(info) =
                self.devices.get(&key).filter(|d| d.conn.is_some()).and_then(|d| d.connected_info.clone())
            {
                self.handler.frontend_closed(&info);
            }
        }
        let actions = machine::step(&view);
        log::debug!("vtpm {fe}/{handle}: {view:?} -> {actions:?}");
        for action in actions {
            match action {
                Action::Disconnect => self.disconnect(key),
                Action::Write(s) => self.write_state(key, s),
                Action::Connect => self.connect(key),
                Action::ClearError => {
                    if let Some(d) = self.devices.get_mut(&key) {
                        d.error_closed = false;
                    }
                }
                Action::NoteOffline => self.note_offline(key, &be_path),
            }
        }
    }

    /// First sight of a device: check its configuration and take it if it is ours.
    fn adopt(&mut self, key: (DomId, u32), be_path: &str) -> bool {
        let (fe, handle) = key;
        let uuid_path = format!("{be_path}/uuid");
        let uuid = self.read_opt(&uuid_path).map(|raw| parse_uuid(&uuid_path, &raw));
        let uuid_ok = match &uuid {
            Some(Ok(u)) => Some(u.as_str()),
            _ => None,
        };
        if !self.wanted(key, uuid_ok) {
            return false;
        }
        let expected_fe = xenbus::vtpm_frontend_path(fe, handle);
        let fe_path = self.read_opt(&format!("{be_path}/frontend")).map(|v| String::from_utf8_lossy(&v).into_owned());
        let fe_id = self.read_opt(&format!("{be_path}/frontend-id")).map(|v| parse_num::<DomId>(be_path, &v));
        let problem = match (&uuid, &fe_path, &fe_id) {
            (None, _, _) => Some("no uuid in the backend directory (libxl writes one; it names the vTPM)".to_string()),
            (Some(Err(e)), _, _) => Some(format!("malformed uuid: {e}")),
            (_, None, _) => Some("no frontend path in the backend directory".to_string()),
            (_, Some(p), _) if !p.starts_with(&format!("/local/domain/{fe}/")) => {
                Some(format!("frontend path {p:?} is not inside domain {fe}"))
            }
            (_, _, None) => Some("no frontend-id in the backend directory".to_string()),
            (_, _, Some(Ok(id))) if *id != fe => Some(format!("frontend-id {id} does not match the device path")),
            (_, _, Some(Err(e))) => Some(format!("bad frontend-id: {e}")),
            _ => None,
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut dev = Device {
            info: None,
            be_path: be_path.to_string(),
            fe_path: fe_path.unwrap_or(expected_fe),
            watching_fe: false,
            written: None,
            error_closed: false,
            conn: None,
            generation,
            adopted_connected: false,
            shutdown_seen: None,
            connected_info: None,
        };
        if let Some(p) = problem {
            log::error!("vtpm {fe}/{handle}: {p}; refusing the device");
            self.devices.insert(key, dev);
            self.write_keys(key, &[("error", p.as_bytes())], None);
            return true;
        }
        let uuid = uuid_ok.unwrap_or_default().to_string();
        dev.info = Some(DeviceInfo { frontend: fe, handle, uuid, life: None, adopted: false });
        let fe_state_path = format!("{}/state", dev.fe_path);
        if let Some(index) = self.frontends.as_mut() {
            index.entry(fe).or_default().insert(dev.fe_path.clone(), handle);
        } else {
            match self.xs.watch(&fe_state_path, &fe_token(key)) {
                Ok(()) => dev.watching_fe = true,
                Err(e) => log::warn!("vtpm {fe}/{handle}: cannot watch {fe_state_path}: {e}"),
            }
        }
        let current = self.read_opt(&format!("{be_path}/state")).and_then(|v| XenbusState::parse(be_path, &v).ok());
        let first_state = machine::adopt(current);
        dev.adopted_connected = current == Some(XenbusState::Connected);
        log::info!("vtpm {fe}/{handle}: new device, uuid {}", dev.info.as_ref().map(|i| i.uuid.as_str()).unwrap_or(""));
        self.devices.insert(key, dev);
        // Linux's xen-tpmfront refuses a backend without protocol v2: announce it first.
        self.write_keys(key, &[("feature-protocol-v2", b"1")], first_state);
        true
    }

    fn connect(&mut self, key: (DomId, u32)) {
        let (fe, handle) = key;
        let Some(dev) = self.devices.get(&key) else { return };
        let Some(mut info) = dev.info.clone() else { return };
        info.adopted = dev.adopted_connected;
        let be_path = dev.be_path.clone();
        let fe_path = dev.fe_path.clone();
        info.life = self.domain_life(key, &be_path);
        let existing = dev.conn.as_ref().map(|c| (c.ring_ref, c.remote_port));
        let xs = self.xs.clone();
        let read_num = |name: &str| -> std::result::Result<u32, String> {
            let p = format!("{fe_path}/{name}");
            match xs.try_read(TxId::NONE, &p) {
                Ok(Some(v)) => parse_num::<u32>(&p, &v).map_err(|e| e.to_string()),
                Ok(None) => Err(format!("frontend has no {name}")),
                Err(e) => Err(format!("cannot read {p}: {e}")),
            }
        };
        let (ring_ref, remote_port) = match (read_num("ring-ref"), read_num("event-channel")) {
            (Ok(r), Ok(p)) => (r, p),
            (Err(e), _) | (_, Err(e)) => return self.close_with_error(key, &e),
        };
        if let Some(c) = existing {
            if c == (ring_ref, remote_port) {
                return;
            }
            // The frontend set up a new ring without closing the old one (a guest reboot we
            // did not see): start over on the new one.
            self.disconnect(key);
        }
        match read_num("feature-protocol-v2") {
            Ok(1) => {}
            _ => return self.close_with_error(key, "frontend does not support vTPM protocol v2 (feature-protocol-v2)"),
        }
        let page = match self.mapper.map(fe, ring_ref, true) {
            Ok(p) => Arc::new(p),
            Err(e) => return self.close_with_error(key, &format!("cannot map ring-ref {ring_ref}: {e}")),
        };
        let dispatcher = match self.dispatcher() {
            Ok(d) => d,
            Err(e) => return self.close_with_error(key, &e),
        };
        let evtchn = dispatcher.evtchn().clone();
        let port = match evtchn.bind_interdomain(fe, remote_port) {
            Ok(p) => p,
            Err(e) => return self.close_with_error(key, &format!("cannot bind event-channel {remote_port}: {e}")),
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let info_now = info.clone();
        let worker = Worker {
            info,
            generation,
            page,
            evtchn,
            port,
            handler: self.handler.clone(),
            fatal: self.fatal_tx.clone(),
        };
        let conn = Connection::start(&dispatcher, worker, ring_ref, remote_port);
        if let Some(dev) = self.devices.get_mut(&key) {
            dev.conn = Some(conn);
            dev.generation = generation;
            dev.adopted_connected = false;
            dev.connected_info = Some(info_now);
            dev.shutdown_seen = None;
        }
        self.write_keys(key, &[("ready", b"1")], Some(XenbusState::Connected));
        log::info!("vtpm {fe}/{handle}: connected (ring-ref {ring_ref}, event-channel {remote_port})");
        // A process started while its guest was suspended (being saved) hears of it here.
        if self.follows_domains {
            self.check_domain(key);
        }
    }

    /// Whether the hypervisor answers our questions about domains (dom0 only, by default):
    /// else suspends cannot be told from reboots, and are not followed.
    fn may_ask_about_domains(&self) -> bool {
        match self.xen.domain_info(self.xen.domid()) {
            Ok(_) => true,
            Err(e) => {
                log::info!("this domain cannot ask Xen about other domains ({e})");
                false
            }
        }
    }

    /// A domain shut down or went (`@releaseDomain`): ask the hypervisor about the guest of
    /// each device that was connected, connected still or not (a guest may let go of its
    /// device before it reboots).
    fn domains_changed(&mut self) {
        let keys: Vec<_> = self.devices.iter().filter(|(_, d)| d.connected_info.is_some()).map(|(k, _)| *k).collect();
        for key in keys {
            self.check_domain(key);
        }
    }

    /// Tells the handler that a connected device's guest shut down and why: a suspend (`xl
    /// save`, `xl migrate`, a checkpoint) or the end of its platform. Told at every event while
    /// the domain is shut down (the handler ignores what it knows): a domain resumed in place
    /// and suspended again looks the same to us, since xenstored fires nothing at a resume.
    fn check_domain(&mut self, key: (DomId, u32)) {
        // Gone: whatever it did, its ring is no longer ours to serve.
        let Some(reason) = self.domain_of(key).map(|d| d.shutdown) else { return };
        let Some(dev) = self.devices.get_mut(&key) else { return };
        let Some(info) = dev.connected_info.clone() else { return };
        if dev.shutdown_seen != reason {
            dev.shutdown_seen = reason;
            if let Some(reason) = reason {
                log::info!("vtpm {}/{}: domain {} shut down ({reason})", key.0, key.1, key.0);
            }
        }
        if let Some(reason) = reason {
            self.handler.domain_shut_down(&info, reason);
        }
    }

    /// The frontend domain's `vm` path and its `start_time`: together they differ for every
    /// domain libxl makes, even one reusing an old domain id. Read without logging: a backend
    /// outside dom0 is not allowed to, and takes them from what dom0's `xvtpmd` wrote into the
    /// device's directory, waiting for it up to [`BackendConfig::guest_life_wait`] (polled:
    /// only while a connection is made).
    fn domain_life(&self, key: (DomId, u32), be_path: &str) -> Option<String> {
        if let Ok(Some(life)) = xvtpm_xen::toolstack::domain_life(&self.xs, key.0) {
            return Some(life);
        }
        let read = |p: &str| self.xs.try_read(TxId::NONE, p).ok().flatten();
        let given = format!("{be_path}/{GUEST_LIFE_KEY}");
        let start = std::time::Instant::now();
        loop {
            if let Some(life) = read(&given).and_then(|v| String::from_utf8(v).ok()).filter(|l| !l.is_empty()) {
                return Some(life);
            }
            if start.elapsed() >= self.guest_life_wait {
                if !self.guest_life_wait.is_zero() {
                    log::warn!(
                        "vtpm {}/{}: no life of domain {} in {given} after {:?} (is xvtpmd running in dom0?): \
                         its TPM cannot be matched to a snapshot",
                        key.0,
                        key.1,
                        key.0,
                        self.guest_life_wait
                    );
                }
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn shutdown(&mut self) {
        let keys: Vec<_> = self.devices.keys().copied().collect();
        for key in keys {
            self.disconnect(key);
        }
        if let Some(d) = self.dispatcher.take() {
            d.stop();
        }
    }

    /// The dispatcher, started at the first connection: one event channel handle for every
    /// device; a backend of every device serves on [`WORKERS`] threads, one of a single device
    /// on the thread that waits for its events.
    fn dispatcher(&mut self) -> std::result::Result<Arc<Dispatcher>, String> {
        if let Some(d) = &self.dispatcher {
            return Ok(d.clone());
        }
        let evtchn = self.xen.evtchn().map_err(|e| format!("cannot open an event channel handle: {e}"))?;
        let workers = if self.filter == DeviceFilter::All { WORKERS } else { 0 };
        let d = Dispatcher::start(Arc::from(evtchn), workers)
            .map_err(|e| format!("cannot start the threads that serve devices: {e}"))?;
        self.dispatcher = Some(d.clone());
        Ok(d)
    }
}

fn parse_fe_token(token: &str) -> Option<(DomId, u32)> {
    let rest = token.strip_prefix("vtpm-fe/")?;
    let (a, b) = rest.split_once('/')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}
