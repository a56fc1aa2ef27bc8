//! Where each vTPM lives (`<state-root>/<uuid>`: `state/`, `token` when its key is at the
//! manager, and `made`, written last by a create that completed) and making one on first use.
//! A create cut short (the daemon killed, the manager unreachable) leaves `creating`, so the
//! next try knows the directory is its own to undo; a directory without either marker is not
//! xvtpmd's and is never touched. A vTPM that a live migration brings (`xvtpm migrate-accept`)
//! has `arriving` (the pid of the accepting process) until it is in place, then `made`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xvtpm_vtpmmgr::admin::Admin;

use super::layout::{ARRIVING, CREATING, MADE, STATE, TOKEN, VERSION};

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

/// How every vtpm is made and run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The vtpm executable.
    pub vtpm: PathBuf,
    /// Each vTPM in `<root>/<uuid>`.
    pub state_root: PathBuf,
    /// Where the keys are.
    pub keys: Keys,
    /// Where the vtpms keep their volatile snapshots.
    pub snapshot_dir: PathBuf,
    /// A vTPM with no state here is created rather than refused.
    pub auto_create: bool,
    /// Created vTPMs are TPM 1.2.
    pub tpm12: bool,
    /// How long creating one may take: each exchange with the manager, and `vtpm create`.
    pub create_timeout: Duration,
    /// The simulated Xen (its directory) and our domain id there, for tests.
    pub sim: Option<(PathBuf, u16)>,
    /// Each vtpm's sandbox (`None`: they run as the daemon does).
    pub sandbox: Option<super::sandbox::Sandboxing>,
}

impl Spec {
    /// The vTPM's directory.
    pub fn vtpm_dir(&self, uuid: &str) -> PathBuf {
        self.state_root.join(uuid)
    }

    /// The arguments that name the vTPM's state and key, for `vtpm create` and `vtpm serve`.
    pub fn state_args(&self, cmd: &mut Command, uuid: &str) {
        let dir = self.vtpm_dir(uuid);
        cmd.arg("--state-dir").arg(dir.join(STATE));
        // The version it was made with; one made before that was recorded, the configured one
        // (what it was made with, unless the configuration changed since).
        let tpm12 = match fs::read_to_string(dir.join(VERSION)) {
            Ok(v) => v.trim() == "1.2",
            Err(_) => self.tpm12,
        };
        if tpm12 {
            cmd.arg("--tpm1.2");
        }
        if let Keys::Manager { socket, .. } = &self.keys {
            cmd.arg("--manager").arg(format!("unix:{}", socket.display()));
            cmd.args(["--vtpm-uuid", uuid]).arg("--token-file").arg(dir.join(TOKEN));
        }
        if let Some((dir, domid)) = &self.sim {
            cmd.arg("--sim").arg(dir).args(["--domid", &domid.to_string()]);
        }
    }

    /// vTPM `uuid`'s own snapshot directory, `<snapshot-dir>/<uuid>` (the only one its
    /// sandbox shows). Snapshots a vtpm of an earlier release left in `<snapshot-dir>` itself
    /// are moved in first, so that its guest's TPM is resumed across the upgrade.
    pub fn snapshot_dir_of(&self, uuid: &str) -> Result<PathBuf, String> {
        let dir = self.snapshot_dir.join(uuid);
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .map_err(|e| format!("create {}: {e}", dir.display()))?;
        let state = self.vtpm_dir(uuid).join(STATE);
        if let Ok(old) = xvtpm_vtpm::snapshot::SnapshotFile::for_state_dir(&self.snapshot_dir, &state) {
            for path in old.paths() {
                let Some(name) = path.file_name() else { continue };
                if path.exists() && !dir.join(name).exists() {
                    fs::rename(path, dir.join(name))
                        .map_err(|e| format!("move {} into {}: {e}", path.display(), dir.display()))?;
                    log::info!("vTPM {uuid}: snapshot {} moved into {}", path.display(), dir.display());
                }
            }
        }
        Ok(dir)
    }

    /// Whether vTPM `uuid` is on its way here: `xvtpm migrate-accept` made its directory and
    /// still holds the lock of its mark (a lock, unlike a pid, cannot outlive its process).
    /// `Err`: an arrival cut short (for the log).
    pub fn arriving(&self, uuid: &str) -> Result<bool, String> {
        let dir = self.vtpm_dir(uuid);
        if dir.join(MADE).exists() {
            return Ok(false);
        }
        let Ok(mark) = fs::File::open(dir.join(ARRIVING)) else { return Ok(false) };
        match mark.try_lock_shared() {
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(e)) => {
                Err(format!("cannot test the lock of {}: {e}", dir.join(ARRIVING).display()))
            }
            Ok(()) => Err(format!(
                "{} holds a vTPM whose migration here was cut short (no `xvtpm migrate-accept` holds its \
                 `{ARRIVING}` mark): remove the directory (and the vTPM at the manager, `xvtpm vtpm delete \
                 {uuid}`, if it was imported) to let the guest come again",
                dir.display()
            )),
        }
    }

    /// The vTPM is here, or made now if allowed. A guest that arrives (`incoming`: a restore
    /// or a migration) never gets a vTPM made for it: a new TPM would hand it reset PCRs.
    /// `Err`: for the log (host paths included).
    pub fn prepare(&self, uuid: &str, tpm12: Option<bool>, incoming: bool) -> Result<bool, String> {
        let dir = self.vtpm_dir(uuid);
        if dir.join(MADE).exists() {
            return Ok(false);
        }
        if dir.join(ARRIVING).exists() {
            return Err(format!(
                "{} is a vTPM still arriving by a migration, or one cut short; not served until it is in place",
                dir.display()
            ));
        }
        if dir.exists() && !dir.join(CREATING).exists() {
            return Err(format!("{} exists but xvtpmd did not make it (no {MADE}); not touching it", dir.display()));
        }
        if incoming {
            return Err(format!(
                "the guest arrives (a restore or a migration) but this host has no vTPM for it ({} does not \
                 exist); none is made, since a new TPM would give it reset PCRs: move its vTPM with `xvtpm migrate`",
                dir.display()
            ));
        }
        if !self.auto_create {
            return Err(format!(
                "no vTPM here ({} does not exist) and auto-create is off: set `auto-create = true` in the \
                 configuration (or --auto-create), and the guest's next start creates it",
                dir.display()
            ));
        }
        if dir.exists() {
            log::warn!("vTPM {uuid}: an earlier create was cut short; undoing it");
            self.undo(uuid, &dir)?;
        }
        self.create(uuid, &dir, tpm12.unwrap_or(self.tpm12)).map(|()| true)
    }

    /// Creates vTPM `uuid` in `dir`: the marker, its token provisioned at the manager (keys
    /// at the manager), its state (`vtpm create`), then [`MADE`]. A failure undoes it all.
    fn create(&self, uuid: &str, dir: &Path, tpm12: bool) -> Result<(), String> {
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir.join(STATE))
            .map_err(|e| format!("create {}: {e}", dir.display()))?;
        durable_file(&dir.join(CREATING), b"")?;
        let made = self.create_inside(uuid, dir, tpm12);
        if made.is_err() {
            if let Err(e) = self.undo(uuid, dir) {
                log::error!("vTPM {uuid}: {e}");
            }
        }
        made
    }

    fn create_inside(&self, uuid: &str, dir: &Path, tpm12: bool) -> Result<(), String> {
        if let Keys::Manager { admin, group, .. } = &self.keys {
            let token: [u8; 32] = rand::random();
            durable_file(&dir.join(TOKEN), &token)?;
            let id = xvtpm_proto::Uuid::parse(uuid).map_err(|e| e.to_string())?.0;
            let mut a = Admin::connect_with_timeout(admin, self.create_timeout)
                .map_err(|e| format!("the manager's admin socket {}: {e}", admin.display()))?;
            a.provision(Some(id), *group, Some(&token)).map_err(|e| format!("provisioning at the manager: {e}"))?;
        }
        durable_file(&dir.join(VERSION), if tpm12 { b"1.2\n" } else { b"2.0\n" })?;
        let mut cmd = Command::new(&self.vtpm);
        cmd.arg("create");
        // With the version just written.
        self.state_args(&mut cmd, uuid);
        let stderr = run_for(&mut cmd, self.create_timeout).map_err(|e| format!("{}: {e}", self.vtpm.display()))?;
        if let Some(stderr) = stderr {
            return Err(format!("vtpm create failed: {}", stderr.trim()));
        }
        durable_file(&dir.join(MADE), b"")?;
        let _ = fs::remove_file(dir.join(CREATING));
        Ok(())
    }

    /// Removes what a create made: the vTPM at the manager (if it was provisioned; its token
    /// is the proof), then the directory. If the manager cannot be told, the directory stays
    /// (with its token) for the next try.
    fn undo(&self, uuid: &str, dir: &Path) -> Result<(), String> {
        if let (Keys::Manager { admin, .. }, true) = (&self.keys, dir.join(TOKEN).exists()) {
            let id = xvtpm_proto::Uuid::parse(uuid).map_err(|e| e.to_string())?.0;
            match Admin::connect_with_timeout(admin, self.create_timeout).and_then(|mut a| a.delete(&id)) {
                Ok(()) | Err(xvtpm_vtpmmgr::Error::UnknownVtpm(_) | xvtpm_vtpmmgr::Error::NotFound(_)) => {}
                Err(e) => {
                    return Err(format!("could not delete it at the manager again ({e}); {} kept", dir.display()))
                }
            }
        }
        fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))
    }
}

/// Runs `cmd` for at most `timeout` (then kills it): `None` if it succeeded, else what it
/// wrote to stderr.
fn run_for(cmd: &mut Command, timeout: Duration) -> Result<Option<String>, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    // Polled only while a create runs: nothing wakes at rest.
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("create did not finish in {timeout:?}; killed"));
            }
            Err(e) => return Err(format!("cannot wait for it: {e}")),
        }
    };
    let mut stderr = String::new();
    if let Some(mut s) = child.stderr.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut stderr);
    }
    Ok((!status.success()).then_some(stderr))
}

/// Writes a file (mode 0600) and makes it and its name durable.
fn durable_file(path: &Path, data: &[u8]) -> Result<(), String> {
    let err = |e: std::io::Error| format!("write {}: {e}", path.display());
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(err)?;
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| format!("sync {}: {e}", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "6a6b6c6d-6e6f-4071-8273-747576777879";

    fn spec(name: &str) -> Spec {
        let root = std::env::temp_dir().join(format!("xvtpmd-provision-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).expect("root");
        Spec {
            // Never run: these tests stop before any create.
            vtpm: PathBuf::from("/nonexistent/vtpm"),
            state_root: root.join("vtpms"),
            keys: Keys::None,
            snapshot_dir: root.join("snapshots"),
            auto_create: true,
            tpm12: false,
            create_timeout: Duration::from_secs(1),
            sim: None,
            sandbox: None,
        }
    }

    #[test]
    fn an_arriving_guest_never_gets_a_new_vtpm() {
        let s = spec("incoming");
        let why = s.prepare(UUID, None, true).expect_err("refused");
        assert!(why.contains("xvtpm migrate"), "{why}");
        assert!(!s.vtpm_dir(UUID).exists(), "nothing made");
        assert_eq!(s.arriving(UUID), Ok(false), "no arrival under way");
    }

    #[test]
    fn an_arrival_is_waited_for_only_while_its_accepter_runs() {
        let s = spec("arriving");
        let dir = s.vtpm_dir(UUID);
        fs::create_dir_all(dir.join(STATE)).expect("state");
        // Nobody holds the mark's lock: its accepter is gone.
        fs::write(dir.join(ARRIVING), b"4242").expect("mark");
        let why = s.arriving(UUID).expect_err("cut short");
        assert!(why.contains("cut short") && why.contains(&format!("xvtpm vtpm delete {UUID}")), "{why}");
        // Neither a boot nor an arrival gets it, and nothing of it is touched.
        for incoming in [false, true] {
            let why = s.prepare(UUID, None, incoming).expect_err("not served");
            assert!(why.contains("still arriving"), "{why}");
        }
        assert!(dir.join(ARRIVING).exists() && dir.join(STATE).exists());
        // Complete: `made` is written before the mark goes, and either way it is served.
        fs::write(dir.join(MADE), b"").expect("made");
        assert_eq!(s.arriving(UUID), Ok(false));
        fs::remove_file(dir.join(ARRIVING)).expect("unmark");
        assert_eq!(s.prepare(UUID, None, true), Ok(false), "here, not created");
    }

    #[test]
    fn an_accepter_is_running_while_it_holds_its_marks_lock() {
        let s = spec("accepter");
        let dir = s.vtpm_dir(UUID);
        fs::create_dir_all(dir.join(STATE)).expect("state");
        let mark = fs::File::create(dir.join(ARRIVING)).expect("mark");
        mark.try_lock().expect("the accepter's lock");
        assert_eq!(s.arriving(UUID), Ok(true));
        drop(mark);
        assert!(s.arriving(UUID).is_err(), "its accepter is gone");
    }
}
