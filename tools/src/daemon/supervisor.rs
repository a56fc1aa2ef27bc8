//! One `vtpm serve` per device: started when its device appears, restarted when it dies (after
//! a pause that doubles while it keeps dying), stopped when its device's directory goes. The
//! vtpm's own rules decide what a restart under a running guest gets (its snapshot resumed, or
//! the TPM's failure response): never reset PCRs.
//!
//! Each child is watched by a thread that waits for its end without reaping it, so its pid
//! stays its own until this (main-loop) side has forgotten it and reaps it.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant, SystemTime};

use xvtpm_xen::xenstore::Waker;
use xvtpm_xen::{DomId, Xenstore};

use super::devices::{self, Device};
use super::provision::{Keys, Spec};
use super::status::Status;

/// First pause before a restart; it doubles up to [`MAX_BACKOFF`], and starts over once a vtpm
/// has run for [`STABLE`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE: Duration = Duration::from_secs(60);

/// A vtpm process ended: its uuid and its start's number.
pub type Exit = (String, u64);

enum Run {
    Running {
        child: Child,
        since: Instant,
    },
    /// To be restarted at `at`.
    Waiting {
        at: Instant,
    },
    /// SIGTERMed: reaped when its end is reported; started again then if `again`.
    Stopping {
        child: Child,
        again: bool,
    },
    /// Closed; retried only if its device goes and comes back.
    Refused,
    /// An HVM guest's vTPM that a migration brings: started once `xvtpm migrate-accept` has
    /// put it in place (it says so in the guest's request directory).
    Arriving,
}

struct Entry {
    device: Device,
    run: Run,
    /// Counts starts: an exit report of an earlier start is stale.
    generation: u64,
    started_unix: u64,
    restarts: u32,
    backoff: Duration,
    last_error: Option<String>,
    /// Its vtpm was told that its HVM guest's domain suspended (SIGUSR2), this shutdown.
    told_suspend: bool,
}

/// The vtpm processes.
pub struct Supervisor {
    spec: Spec,
    xs: Xenstore,
    me: DomId,
    entries: HashMap<String, Entry>,
    /// Devices refused for their own sake (bad or duplicate uuid), so they are closed once.
    refused_devices: HashSet<(DomId, u32)>,
    exits_tx: Sender<Exit>,
    /// Where exit reports arrive (the main loop drains it).
    pub exits: Receiver<Exit>,
    wake: Waker,
    next_generation: u64,
}

impl Supervisor {
    /// A supervisor for domain `me` that reports exits through its channel and wakes `wake`.
    pub fn new(spec: Spec, xs: Xenstore, me: DomId, wake: Waker) -> Self {
        let (exits_tx, exits) = std::sync::mpsc::channel();
        Self {
            spec,
            xs,
            me,
            entries: HashMap::new(),
            refused_devices: HashSet::new(),
            exits_tx,
            exits,
            wake,
            next_generation: 1,
        }
    }

    /// Brings the processes in line with `devices`: a vtpm for each, none for a device gone.
    pub fn reconcile(&mut self, devices: &[Device]) {
        let mut wanted: HashMap<String, &Device> = HashMap::new();
        let present: HashSet<(DomId, u32)> = devices.iter().map(Device::key).collect();
        self.refused_devices.retain(|k| present.contains(k));
        for d in devices {
            let uuid = match &d.uuid {
                Ok(u) => u,
                Err(why) => {
                    self.refuse_device(d, &format!("{why}; not served"), "the device has no usable uuid");
                    continue;
                }
            };
            match wanted.get(uuid).copied() {
                Some(first) if first.key() != d.key() => {
                    // The one already served keeps its vTPM, whatever order xenstore lists them
                    // in: a second guest naming it never takes it from a running one.
                    let served = |x: &Device| self.entries.get(uuid).is_some_and(|e| e.device.key() == x.key());
                    let (keep, other) = if served(d) { (d, first) } else { (first, d) };
                    let why = format!(
                        "{} names the vTPM {uuid} of {} too; two guests never share one",
                        other.name(),
                        keep.name()
                    );
                    wanted.insert(uuid.clone(), keep);
                    self.refuse_device(other, &why, "another device names this vTPM");
                }
                _ => {
                    wanted.insert(uuid.clone(), d);
                }
            }
        }
        let uuids: Vec<String> = self.entries.keys().cloned().collect();
        let mut arriving = Vec::new();
        for u in uuids {
            let moved = match wanted.get(&u) {
                None => true,
                Some(d) => self.entries.get(&u).is_some_and(|e| e.device.key() != d.key()),
            };
            if moved {
                self.stop(&u, "device gone");
            }
        }
        for (u, d) in wanted {
            match self.entries.get_mut(&u) {
                None => self.add(&u, d.clone()),
                Some(e) => {
                    if let Run::Stopping { again, .. } = &mut e.run {
                        // Back (or moved) while its old vtpm ends: start once that is reaped.
                        *again = true;
                        e.device = d.clone();
                    } else if matches!(e.run, Run::Refused) {
                        devices::answer_removal(&self.xs, d, self.me);
                    }
                    if d.is_hvm() {
                        tell_suspend(e, d.suspended);
                    }
                    if matches!(e.run, Run::Arriving) {
                        arriving.push(u.clone());
                    }
                }
            }
        }
        for d in devices.iter().filter(|d| self.refused_devices.contains(&d.key())) {
            devices::answer_removal(&self.xs, d, self.me);
        }
        for u in arriving {
            self.settle_arrival(&u);
        }
    }

    /// An arriving vTPM: started once it is in place; refused if its migration here was
    /// called off (or cut short); else still waited for.
    fn settle_arrival(&mut self, uuid: &str) {
        let Some(mut e) = self.entries.remove(uuid) else { return };
        let settled = match self.spec.arriving(uuid) {
            Ok(true) => None,
            Ok(false) => Some(self.spec.prepare(uuid, e.device.tpm12, true).map(|_| ())),
            Err(why) => Some(Err(why)),
        };
        match settled {
            None => {}
            Some(Ok(())) => {
                log::info!("{}: vTPM {uuid} arrived", e.device.name());
                self.start(uuid, &mut e);
            }
            Some(Err(why)) => {
                log::error!("{}: vTPM {uuid} did not arrive: {why}", e.device.name());
                devices::refuse(&self.xs, &e.device, &format!("vTPM {uuid}'s migration to this host did not complete"));
                e.run = Run::Refused;
                e.last_error = Some(why);
            }
        }
        self.entries.insert(uuid.to_string(), e);
    }

    fn refuse_device(&mut self, d: &Device, why: &str, guest_why: &str) {
        if self.refused_devices.insert(d.key()) {
            log::error!("{}: {why}", d.name());
            devices::refuse(&self.xs, d, guest_why);
        }
    }

    fn add(&mut self, uuid: &str, device: Device) {
        let mut e = Entry {
            device,
            run: Run::Refused,
            generation: 0,
            started_unix: 0,
            restarts: 0,
            backoff: FIRST_BACKOFF,
            last_error: None,
            told_suspend: false,
        };
        if e.device.incoming {
            match self.spec.arriving(uuid) {
                Ok(true) => {
                    log::info!(
                        "{}: vTPM {uuid} arrives by a migration; it starts once it is in place",
                        e.device.name()
                    );
                    devices::arriving(&self.xs, &e.device);
                    e.run = Run::Arriving;
                    self.entries.insert(uuid.to_string(), e);
                    return;
                }
                Ok(false) => {}
                Err(why) => {
                    log::error!("{}: vTPM {uuid}: {why}", e.device.name());
                    devices::refuse(
                        &self.xs,
                        &e.device,
                        &format!("vTPM {uuid}'s migration to this host did not complete"),
                    );
                    e.last_error = Some(why);
                    self.entries.insert(uuid.to_string(), e);
                    return;
                }
            }
        }
        match self.spec.prepare(uuid, e.device.tpm12, e.device.incoming) {
            Ok(created) => {
                if created {
                    log::info!("{}: created vTPM {uuid}", e.device.name());
                }
                self.start(uuid, &mut e);
            }
            Err(why) => {
                log::error!("{}: vTPM {uuid}: {why}", e.device.name());
                // What the guest may read too: no host paths (the log has them).
                let guest_why = if e.device.incoming {
                    format!("no vTPM {uuid} on this host for an arriving guest; its vTPM moves with `xvtpm migrate`")
                } else {
                    format!(
                        "no vTPM {uuid} on this host; the administrator can let xvtpmd create it (auto-create = true, or --auto-create)"
                    )
                };
                devices::refuse(&self.xs, &e.device, &guest_why);
                e.last_error = Some(why);
            }
        }
        self.entries.insert(uuid.to_string(), e);
    }

    fn start(&mut self, uuid: &str, e: &mut Entry) {
        let mut cmd = Command::new(&self.spec.vtpm);
        if e.device.is_hvm() {
            // The guest's registers; its request directory says whether it was served before.
            cmd.args(["serve-hvm", "--guest", &e.device.frontend.to_string(), "--request", &e.device.be_path]);
        } else {
            // This device only: a second device naming the same uuid is never served by it.
            cmd.args(["serve", "--frontend", &e.device.frontend.to_string(), "--handle", &e.device.handle.to_string()]);
        }
        self.spec.state_args(&mut cmd, uuid);
        if self.me != 0 {
            // A driver domain may not read its guests' lives: dom0's xvtpmd writes them into
            // each device's directory, and the vtpm waits for that at each connection.
            cmd.args(["--guest-life-wait-secs", "30"]);
        }
        if let Err(why) = self.sandbox_args(&mut cmd, uuid) {
            log::error!("{}: vTPM {uuid}: {why}", e.device.name());
            self.schedule_restart(e, why);
            return;
        }
        cmd.stdin(Stdio::null());
        // systemd's readiness is the daemon's to tell, not its children's.
        cmd.env_remove(xvtpm_cli::notify::NOTIFY_SOCKET);
        let generation = self.next_generation;
        self.next_generation += 1;
        e.generation = generation;
        // A new vtpm has been told nothing yet.
        e.told_suspend = false;
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id();
                log::info!("{}: vtpm for {uuid} started (pid {pid})", e.device.name());
                e.started_unix =
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                e.run = Run::Running { child, since: Instant::now() };
                let (tx, wake, u) = (self.exits_tx.clone(), self.wake.clone(), uuid.to_string());
                let watched = std::thread::Builder::new().name("vtpm-watch".into()).spawn(move || {
                    if let Err(err) = xvtpm_vtpm::sys::child::wait_exited(pid) {
                        log::error!("cannot wait for vtpm pid {pid}: {err}");
                    }
                    if tx.send((u, generation)).is_ok() {
                        wake.wake();
                    }
                });
                if let Err(err) = watched {
                    // Unwatched, its end would go unseen: end it now and retry later.
                    log::error!("{}: cannot watch the vtpm process: {err}", e.device.name());
                    if let Run::Running { mut child, .. } = std::mem::replace(&mut e.run, Run::Refused) {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    self.schedule_restart(e, format!("cannot watch the vtpm: {err}"));
                }
            }
            Err(err) => {
                let why = format!("cannot start {}: {err}", self.spec.vtpm.display());
                log::error!("{}: {why}", e.device.name());
                self.schedule_restart(e, why);
            }
        }
    }

    /// Its snapshot directory, and its sandbox: its uid, group and the manager's socket group.
    fn sandbox_args(&self, cmd: &mut Command, uuid: &str) -> Result<(), String> {
        cmd.arg("--snapshot-dir").arg(self.spec.snapshot_dir_of(uuid)?);
        let admin = match &self.spec.keys {
            Keys::Manager { admin, .. } => Some((admin.as_path(), self.spec.create_timeout)),
            Keys::None => None,
        };
        let Some(sb) = &self.spec.sandbox else {
            // Unsandboxed, the vtpm binds as this process's uid: say so, in case a sandboxed
            // run bound the vTPM to another.
            if let Some((socket, timeout)) = admin {
                super::sandbox::bind_at_manager(socket, timeout, uuid, super::sandbox::own_uid())?;
            }
            return Ok(());
        };
        let uid = sb.uid_for(&self.spec.state_root, uuid, admin)?.to_string();
        cmd.args(["--sandbox-uid", &uid, "--sandbox-gid", &uid, "--domid", &self.me.to_string()]);
        if let Some(g) = sb.group {
            cmd.args(["--sandbox-groups", &g.to_string()]);
        }
        Ok(())
    }

    fn schedule_restart(&self, e: &mut Entry, why: String) {
        e.last_error = Some(why);
        e.run = Run::Waiting { at: Instant::now() + e.backoff };
        e.backoff = (e.backoff * 2).min(MAX_BACKOFF);
    }

    /// A vtpm ended: reap it, then restart it later (its device is still there) or start it
    /// anew (it was stopped for a device that came back).
    pub fn exited(&mut self, (uuid, generation): Exit) {
        let Some(mut e) = self.entries.remove(&uuid) else { return };
        if e.generation != generation {
            self.entries.insert(uuid, e);
            return;
        }
        match std::mem::replace(&mut e.run, Run::Refused) {
            Run::Running { mut child, since } => {
                let how = describe(child.wait());
                if since.elapsed() >= STABLE {
                    e.backoff = FIRST_BACKOFF;
                }
                log::warn!(
                    "{}: vtpm for {uuid} (pid {}) ended ({how}); restarting in {:?}",
                    e.device.name(),
                    child.id(),
                    e.backoff
                );
                e.restarts += 1;
                self.schedule_restart(&mut e, format!("vtpm ended: {how}"));
                self.entries.insert(uuid, e);
            }
            Run::Stopping { mut child, again } => {
                let how = describe(child.wait());
                log::info!("{}: vtpm for {uuid} stopped ({how})", e.device.name());
                if again {
                    // As a new device: an arriving guest's vTPM is checked as at any first start.
                    self.add(&uuid, e.device);
                }
            }
            other => {
                e.run = other;
                self.entries.insert(uuid, e);
            }
        }
    }

    /// Whether an HVM guest's TPM is among the vtpms (its end is its domain's).
    pub fn serves_hvm(&self) -> bool {
        self.entries.values().any(|e| e.device.is_hvm())
    }

    /// How long until the next restart is due.
    pub fn next_due(&self) -> Option<Duration> {
        let at = self.entries.values().filter_map(|e| match e.run {
            Run::Waiting { at } => Some(at),
            _ => None,
        });
        at.min().map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// Restarts the vtpms whose pause is over.
    pub fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.run, Run::Waiting { at } if at <= now))
            .map(|(u, _)| u.clone())
            .collect();
        for u in due {
            if let Some(mut e) = self.entries.remove(&u) {
                self.start(&u, &mut e);
                self.entries.insert(u, e);
            }
        }
    }

    /// Its device is gone (or moved), or the daemon stops (`why`): SIGTERM its vtpm (reaped
    /// when its end is reported).
    fn stop(&mut self, uuid: &str, why: &str) {
        let Some(mut e) = self.entries.remove(uuid) else { return };
        match std::mem::replace(&mut e.run, Run::Refused) {
            Run::Running { child, .. } => {
                log::info!("{}: {why}; stopping the vtpm for {uuid} (pid {})", e.device.name(), child.id());
                terminate(&child);
                e.run = Run::Stopping { child, again: false };
                self.entries.insert(uuid.to_string(), e);
            }
            Run::Stopping { child, .. } => {
                e.run = Run::Stopping { child, again: false };
                self.entries.insert(uuid.to_string(), e);
            }
            // Nothing runs: forget it.
            Run::Waiting { .. } | Run::Refused | Run::Arriving => {}
        }
    }

    /// Stops every vtpm (the daemon is stopping): SIGTERM, which lets each save its snapshot,
    /// up to `grace` for them to end, then SIGKILL.
    pub fn stop_all(&mut self, grace: Duration) {
        let uuids: Vec<String> = self.entries.keys().cloned().collect();
        for u in &uuids {
            self.stop(u, "xvtpmd is stopping");
            if let Some(Run::Stopping { again, .. }) = self.entries.get_mut(u).map(|e| &mut e.run) {
                *again = false;
            }
        }
        let end = Instant::now() + grace;
        while self.entries.values().any(|e| matches!(e.run, Run::Stopping { .. })) {
            match self.exits.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(exit) => self.exited(exit),
                Err(_) => break,
            }
        }
        for (u, e) in self.entries.drain() {
            if let Run::Stopping { mut child, .. } = e.run {
                log::warn!("{}: vtpm for {u} did not stop in {grace:?}; killing it", e.device.name());
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Every vTPM served, for `xvtpm status`.
    pub fn status(&self) -> Vec<Status> {
        let mut out: Vec<Status> = self
            .entries
            .iter()
            .map(|(u, e)| {
                let (state, pid) = match &e.run {
                    Run::Running { child, .. } => ("running", Some(child.id())),
                    Run::Waiting { .. } => ("restarting", None),
                    Run::Stopping { child, .. } => ("stopping", Some(child.id())),
                    Run::Refused => ("refused", None),
                    Run::Arriving => ("arriving", None),
                };
                Status {
                    uuid: u.clone(),
                    guest: e.device.frontend,
                    handle: if e.device.is_hvm() { 0 } else { e.device.handle },
                    hvm: e.device.is_hvm(),
                    state: state.into(),
                    pid,
                    started_unix: pid.map(|_| e.started_unix),
                    restarts: e.restarts,
                    last_error: e.last_error.clone(),
                }
            })
            .collect();
        out.sort_by_key(|s| (s.guest, s.handle));
        out
    }
}

/// Tells an HVM guest's vtpm (SIGUSR2) once that its guest's domain suspended: its snapshot
/// is then marked so, and the guest's restored domain continues it.
fn tell_suspend(e: &mut Entry, suspended: bool) {
    if !suspended {
        e.told_suspend = false;
        return;
    }
    if e.told_suspend {
        return;
    }
    if let Run::Running { child, .. } = &e.run {
        log::info!("{}: its domain suspended; telling its vtpm (pid {})", e.device.name(), child.id());
        match xvtpm_vtpm::sys::signals::signal(child.id(), libc::SIGUSR2) {
            Ok(()) => e.told_suspend = true,
            Err(err) => log::warn!("{}: SIGUSR2 to its vtpm: {err}", e.device.name()),
        }
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        // What the sandbox's filter does to a vtpm that makes a call it forbids (or a vtpm
        // hijacked into trying): named, since that is worth an administrator's look.
        Ok(s) if s.signal() == Some(libc::SIGSYS) => {
            format!("{s}: killed by its sandbox for a forbidden system call")
        }
        Ok(s) => s.to_string(),
        Err(err) => format!("cannot be reaped: {err}"),
    }
}

/// SIGTERM to a vtpm we have not reaped: its pid is still its own.
fn terminate(child: &Child) {
    if let Err(e) = xvtpm_vtpm::sys::signals::terminate(child.id()) {
        log::debug!("SIGTERM to {}: {e}", child.id());
    }
}
