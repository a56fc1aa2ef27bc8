//! One `vtpm serve` per vTPM: started when its device appears, restarted when it dies (after
//! a pause that doubles while it keeps dying), stopped when its device goes. The vtpm's own
//! rules decide what a restart under a running guest gets (its snapshot resumed, or the TPM's
//! failure response): never reset PCRs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use xvtpm_xen::xenstore::Waker;
use xvtpm_xen::{DomId, Xenstore};

use xvtpm_vtpmmgr::admin::Admin;

use super::devices::Device;
use super::status::Status;

/// First pause before a restart; it doubles up to [`MAX_BACKOFF`], and starts over once a vtpm
/// has run for [`STABLE`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE: Duration = Duration::from_secs(60);

/// Where the vTPMs' keys are.
#[derive(Debug, Clone)]
pub enum Keys {
    /// At the manager: its vTPM socket, its admin socket (to provision a vTPM created here)
    /// and the group new vTPMs go into. Each vTPM's token is in `<root>/<uuid>/token`.
    Manager {
        /// The manager's vTPM socket.
        socket: PathBuf,
        /// The manager's admin socket.
        admin: PathBuf,
        /// The group of the vTPMs created here.
        group: u32,
    },
    /// None: the state is integrity-checked, not encrypted.
    None,
}

/// How every vtpm is run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The vtpm executable.
    pub vtpm: PathBuf,
    /// Each vTPM in `<root>/<uuid>`: `state/`, `token` (keys at the manager), and `made`,
    /// written last by a create that completed.
    pub state_root: PathBuf,
    /// Where the keys are.
    pub keys: Keys,
    /// Where the vtpms keep their volatile snapshots.
    pub snapshot_dir: PathBuf,
    /// A vTPM with no state here is created (`vtpm create`) rather than refused.
    pub auto_create: bool,
    /// Created vTPMs are TPM 1.2.
    pub tpm12: bool,
    /// The simulated Xen (its directory) and our domain id there, for tests.
    pub sim: Option<(PathBuf, DomId)>,
}

impl Spec {
    fn vtpm_dir(&self, uuid: &str) -> PathBuf {
        self.state_root.join(uuid)
    }

    fn common_args(&self, cmd: &mut Command, uuid: &str) {
        let dir = self.vtpm_dir(uuid);
        cmd.arg("--state-dir").arg(dir.join("state"));
        if let Keys::Manager { socket, .. } = &self.keys {
            cmd.arg("--manager").arg(format!("unix:{}", socket.display()));
            cmd.args(["--vtpm-uuid", uuid]).arg("--token-file").arg(dir.join("token"));
        }
        if let Some((dir, domid)) = &self.sim {
            cmd.arg("--sim").arg(dir).args(["--domid", &domid.to_string()]);
        }
    }
}

/// A vtpm process ended: its uuid, its start's number, how it ended.
pub type Exit = (String, u64, std::io::Result<ExitStatus>);

struct Entry {
    device: Device,
    pid: Option<u32>,
    /// Counts starts: an exit report of an earlier start is stale.
    generation: u64,
    started: Instant,
    restarts: u32,
    backoff: Duration,
    restart_at: Option<Instant>,
    last_error: Option<String>,
    refused: bool,
}

/// The vtpm processes.
pub struct Supervisor {
    spec: Spec,
    xs: Xenstore,
    entries: HashMap<String, Entry>,
    exits_tx: Sender<Exit>,
    /// Where exit reports arrive (the main loop drains it).
    pub exits: Receiver<Exit>,
    wake: Waker,
    next_generation: u64,
}

impl Supervisor {
    /// A supervisor that reports exits through its channel and wakes `wake` for each.
    pub fn new(spec: Spec, xs: Xenstore, wake: Waker) -> Self {
        let (exits_tx, exits) = std::sync::mpsc::channel();
        Self { spec, xs, entries: HashMap::new(), exits_tx, exits, wake, next_generation: 1 }
    }

    /// Brings the processes in line with `devices`: a vtpm for each, none for a device gone.
    pub fn reconcile(&mut self, devices: &[Device]) {
        let mut wanted: HashMap<String, &Device> = HashMap::new();
        for d in devices {
            match &d.uuid {
                Err(why) => log::error!("{}: {why}; not served", d.name()),
                Ok(u) => {
                    if let Some(other) = wanted.insert(u.clone(), d) {
                        log::error!("{} and {} name the same vTPM {u}; serving only the first", other.name(), d.name());
                        wanted.insert(u.clone(), other);
                    }
                }
            }
        }
        let gone: Vec<String> = self.entries.keys().filter(|u| !wanted.contains_key(*u)).cloned().collect();
        for u in gone {
            self.stop(&u);
        }
        for (u, d) in wanted {
            if !self.entries.contains_key(&u) {
                self.add(&u, d.clone());
            }
        }
    }

    fn add(&mut self, uuid: &str, device: Device) {
        let mut e = Entry {
            device,
            pid: None,
            generation: 0,
            started: Instant::now(),
            restarts: 0,
            backoff: FIRST_BACKOFF,
            restart_at: None,
            last_error: None,
            refused: false,
        };
        match self.prepare(uuid, &e.device) {
            Ok(()) => self.start(uuid, &mut e),
            Err(why) => {
                log::error!("{}: {why}", e.device.name());
                refuse(&self.xs, &e.device, &why);
                e.refused = true;
                e.last_error = Some(why);
            }
        }
        self.entries.insert(uuid.to_string(), e);
    }

    /// The vTPM is there, or made now if allowed.
    fn prepare(&self, uuid: &str, d: &Device) -> Result<(), String> {
        let dir = self.spec.vtpm_dir(uuid);
        if dir.join(MADE).exists() {
            return Ok(());
        }
        if !self.spec.auto_create {
            return Err(format!(
                "no vTPM {uuid} on this host (no {}): restart xvtpmd with --auto-create to have it created \
                 (and provisioned at the manager), or move the vTPM here (`xvtpm migrate`)",
                dir.display()
            ));
        }
        // A create cut short earlier left a directory without MADE: start over.
        let _ = std::fs::remove_dir_all(&dir);
        create(&self.spec, uuid, &dir).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&dir);
        })?;
        log::info!("{}: created vTPM {uuid} in {}", d.name(), dir.display());
        Ok(())
    }

    fn start(&mut self, uuid: &str, e: &mut Entry) {
        let mut cmd = Command::new(&self.spec.vtpm);
        cmd.args(["serve", "--uuid", uuid]);
        self.spec.common_args(&mut cmd, uuid);
        cmd.arg("--snapshot-dir").arg(&self.spec.snapshot_dir).stdin(Stdio::null());
        let generation = self.next_generation;
        self.next_generation += 1;
        e.generation = generation;
        e.started = Instant::now();
        e.restart_at = None;
        match cmd.spawn() {
            Ok(mut child) => {
                e.pid = Some(child.id());
                log::info!("{}: vtpm for {uuid} started (pid {})", e.device.name(), child.id());
                let (tx, wake, u) = (self.exits_tx.clone(), self.wake.clone(), uuid.to_string());
                // The thread owns the child and reaps it; the main loop hears of it at once.
                let spawned = std::thread::Builder::new().name("vtpm-reaper".into()).spawn(move || {
                    let status = child.wait();
                    if tx.send((u, generation, status)).is_ok() {
                        wake.wake();
                    }
                });
                if let Err(err) = spawned {
                    log::error!("{}: cannot watch the vtpm process: {err}", e.device.name());
                }
            }
            Err(err) => {
                let why = format!("cannot start {}: {err}", self.spec.vtpm.display());
                log::error!("{}: {why}", e.device.name());
                e.last_error = Some(why);
                e.pid = None;
                schedule_restart(e);
            }
        }
    }

    /// A vtpm ended: restart it later if its device is still there.
    pub fn exited(&mut self, (uuid, generation, status): Exit) {
        let Some(e) = self.entries.get_mut(&uuid).filter(|e| e.generation == generation) else { return };
        let how = match status {
            Ok(s) => s.to_string(),
            Err(err) => format!("cannot be waited for: {err}"),
        };
        if e.started.elapsed() >= STABLE {
            e.backoff = FIRST_BACKOFF;
        }
        log::warn!(
            "{}: vtpm for {uuid} (pid {:?}) ended ({how}); restarting in {:?}",
            e.device.name(),
            e.pid,
            e.backoff
        );
        e.last_error = Some(format!("vtpm ended: {how}"));
        e.pid = None;
        e.restarts += 1;
        schedule_restart(e);
    }

    /// How long until the next restart is due.
    pub fn next_due(&self) -> Option<Duration> {
        self.entries.values().filter_map(|e| e.restart_at).min().map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// Restarts the vtpms whose pause is over.
    pub fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.restart_at.is_some_and(|t| t <= now))
            .map(|(u, _)| u.clone())
            .collect();
        for u in due {
            if let Some(mut e) = self.entries.remove(&u) {
                self.start(&u, &mut e);
                self.entries.insert(u, e);
            }
        }
    }

    fn stop(&mut self, uuid: &str) {
        if let Some(e) = self.entries.remove(uuid) {
            if let Some(pid) = e.pid {
                log::info!("{}: device gone; stopping the vtpm for {uuid} (pid {pid})", e.device.name());
                terminate(pid);
            }
        }
    }

    /// Stops every vtpm (the daemon is stopping): SIGTERM, which lets each save its snapshot,
    /// and up to `grace` for them to end.
    pub fn stop_all(&mut self, grace: Duration) {
        let pids: Vec<u32> = self.entries.values().filter_map(|e| e.pid).collect();
        for pid in &pids {
            terminate(*pid);
        }
        let end = Instant::now() + grace;
        let mut left = pids.len();
        while left > 0 {
            match self.exits.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(_) => left -= 1,
                Err(_) => break,
            }
        }
        self.entries.clear();
    }

    /// Every vTPM served, for `xvtpm status`.
    pub fn status(&self) -> Vec<Status> {
        let mut out: Vec<Status> = self
            .entries
            .iter()
            .map(|(u, e)| Status {
                uuid: u.clone(),
                guest: e.device.frontend,
                handle: e.device.handle,
                state: if e.refused {
                    "refused"
                } else if e.pid.is_some() {
                    "running"
                } else {
                    "restarting"
                }
                .into(),
                pid: e.pid,
                uptime_secs: e.pid.map(|_| e.started.elapsed().as_secs()).unwrap_or(0),
                restarts: e.restarts,
                last_error: e.last_error.clone(),
            })
            .collect();
        out.sort_by_key(|s| (s.guest, s.handle));
        out
    }
}

/// Written last into a vTPM's directory by a create that completed.
const MADE: &str = "made";

/// Creates vTPM `uuid` in `dir`: its token provisioned at the manager (keys at the manager),
/// then its state (`vtpm create`), then [`MADE`]. A failure after provisioning deletes the
/// vTPM at the manager again.
fn create(spec: &Spec, uuid: &str, dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir.join("state"))
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut provisioned = None;
    if let Keys::Manager { admin, group, .. } = &spec.keys {
        let token: [u8; 32] = rand::random();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join("token"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, &token))
            .map_err(|e| format!("write the token: {e}"))?;
        let id = xvtpm_proto::Uuid::parse(uuid).map_err(|e| e.to_string())?.0;
        let mut a =
            Admin::connect(admin).map_err(|e| format!("the manager's admin socket {}: {e}", admin.display()))?;
        a.provision(Some(id), *group, Some(&token)).map_err(|e| format!("provisioning at the manager: {e}"))?;
        provisioned = Some((id, admin.clone()));
    }
    let made = (|| {
        let mut cmd = Command::new(&spec.vtpm);
        cmd.arg("create");
        spec.common_args(&mut cmd, uuid);
        if spec.tpm12 {
            cmd.arg("--tpm1.2");
        }
        let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("run {}: {e}", spec.vtpm.display()))?;
        if !out.status.success() {
            return Err(format!("vtpm create failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        std::fs::write(dir.join(MADE), b"").map_err(|e| format!("write {MADE}: {e}"))
    })();
    if made.is_err() {
        if let Some((id, admin)) = provisioned {
            if let Err(e) = Admin::connect(&admin).and_then(|mut a| a.delete(&id)) {
                log::warn!("vTPM {uuid}: could not delete it at the manager again: {e}");
            }
        }
    }
    made
}

fn schedule_restart(e: &mut Entry) {
    e.restart_at = Some(Instant::now() + e.backoff);
    e.backoff = (e.backoff * 2).min(MAX_BACKOFF);
}

/// SIGTERM to a vtpm we started. Its pid is forgotten as soon as its exit is reported, so only
/// an exit not yet reported (a moment's window) could leave the pid to be reused.
fn terminate(pid: u32) {
    if let Err(e) = xvtpm_vtpm::sys::signals::terminate(pid) {
        log::debug!("SIGTERM to {pid}: {e}");
    }
}

/// Closes a device we will not serve, with the reason where the toolstack and the guest can
/// see it (as a backend that refuses a device does).
fn refuse(xs: &Xenstore, d: &Device, why: &str) {
    let be = &d.be_path;
    let r = xs.transaction(|tx| {
        if xs.try_read(tx, &format!("{be}/state"))?.is_none() {
            return Ok(());
        }
        xs.write(tx, &format!("{be}/error"), why.as_bytes())?;
        xs.write(tx, &format!("{be}/state"), b"6")
    });
    if let Err(e) = r {
        log::warn!("{}: cannot write the error to {be}: {e}", d.name());
    }
}
