//! Each vtpm's sandbox as xvtpmd gives it: a user id of its own from a range kept for vTPMs,
//! the same number as its group, and the group of the manager's socket. The uid a vTPM has is
//! recorded as the owner of its state directory (`<state-root>/<uuid>/state`), so it survives
//! restarts of the daemon without a table of its own; the manager is told of it (the vTPM's
//! key is released to that uid alone).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use xvtpm_vtpmmgr::admin::Admin;

/// systemd's table of uid ranges leaves 0x70000000-0x7ffdffff unused: the first 65536 of it.
pub const DEFAULT_UID_BASE: u32 = 0x7000_0000;
/// One uid per vTPM.
pub const DEFAULT_UID_COUNT: u32 = 65536;
/// The group the package makes for the manager's socket.
pub const DEFAULT_GROUP: &str = "xvtpm";

/// The capabilities xvtpmd keeps (and so all its vtpms start with, before each drops them all
/// in its sandbox): its own work (state directories given to a vTPM's uid, signals to the
/// vtpms) and what a vtpm needs to build its sandbox.
pub const KEPT_CAPABILITIES: &[u32] = {
    use xvtpm_vtpm::sys::caps::cap;
    &[
        cap::CHOWN,
        cap::DAC_OVERRIDE,
        cap::DAC_READ_SEARCH,
        cap::FOWNER,
        cap::KILL,
        cap::SETGID,
        cap::SETUID,
        cap::IPC_LOCK,
        cap::SYS_CHROOT,
        cap::SYS_ADMIN,
    ]
};

/// How the vtpms are sandboxed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandboxing {
    /// The first uid for vTPMs.
    pub uid_base: u32,
    /// How many there are.
    pub uid_count: u32,
    /// A supplementary group of every vtpm: the one that may connect to the manager's socket.
    pub group: Option<u32>,
}

impl Sandboxing {
    fn owns(&self, uid: u32) -> bool {
        uid >= self.uid_base && uid - self.uid_base < self.uid_count
    }

    /// vTPM `uuid`'s uid: the owner of its state directory when that is one of ours and no
    /// other vTPM's, else the lowest free one, recorded now (the directory given to it); with
    /// `admin`, told to the manager every time (idempotent there), so that a record that went
    /// astray heals at the next start. `Err`: for the log.
    pub fn uid_for(&self, state_root: &Path, uuid: &str, admin: Option<(&Path, Duration)>) -> Result<u32, String> {
        let state = state_root.join(uuid).join("state");
        let mine = std::fs::symlink_metadata(&state).map_err(|e| format!("{}: {e}", state.display()))?.uid();
        let mut taken = HashSet::new();
        let entries = std::fs::read_dir(state_root).map_err(|e| format!("{}: {e}", state_root.display()))?;
        for entry in entries.flatten() {
            if entry.file_name().to_str() == Some(uuid) {
                continue;
            }
            if let Ok(m) = std::fs::symlink_metadata(entry.path().join("state")) {
                taken.insert(m.uid());
            }
        }
        let kept = self.owns(mine) && !taken.contains(&mine);
        let uid = if kept {
            mine
        } else {
            (self.uid_base..self.uid_base.saturating_add(self.uid_count))
                .find(|u| !taken.contains(u))
                .ok_or_else(|| format!("all {} vTPM uids from {} are in use", self.uid_count, self.uid_base))?
        };
        if let Some((socket, timeout)) = admin {
            // The manager first: a vTPM it still knows by another uid could not get its key.
            bind_at_manager(socket, timeout, uuid, uid)?;
        }
        if !kept {
            std::os::unix::fs::lchown(&state, Some(uid), Some(uid))
                .map_err(|e| format!("give {} to uid {uid}: {e}", state.display()))?;
            log::info!("vTPM {uuid}: runs as uid {uid} from now on");
        }
        Ok(uid)
    }
}

/// Tells the manager that vTPM `uuid`'s clients run as `uid` (it then hands its key to that
/// uid alone).
pub fn bind_at_manager(socket: &Path, timeout: Duration, uuid: &str, uid: u32) -> Result<(), String> {
    let id = xvtpm_proto::Uuid::parse(uuid).map_err(|e| e.to_string())?.0;
    Admin::connect_with_timeout(socket, timeout)
        .and_then(|mut a| a.set_uid(&id, Some(uid)))
        .map_err(|e| format!("cannot tell the manager that vTPM {uuid} runs as uid {uid}: {e}"))
}

/// This process's uid (the owner of its /proc entry), which unsandboxed vtpms run as.
pub fn own_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

/// Refuses a manager socket whose directory would show a sandboxed vtpm more than the socket:
/// the directory of every vTPM's state, the snapshots, or (with the socket beside them) the
/// admin socket and the status file.
pub fn check_socket_dir(socket: &Path, state_root: &Path, snapshot_dir: &Path) -> Result<(), String> {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    for (what, other) in [("state-root", state_root), ("snapshot-dir", snapshot_dir)] {
        if other.starts_with(dir) || dir.starts_with(other) {
            return Err(format!(
                "the manager's vTPM socket {} shares its directory tree with {what} {}: every sandboxed vtpm sees the socket's \
                 directory, so it must hold the socket alone (the package's default is /run/xvtpm/mgr/vtpm.sock; \
                 set manager-socket and vtpmmgr's --socket to match)",
                socket.display(),
                other.display()
            ));
        }
    }
    Ok(())
}

/// Whether this process runs as root (the owner of its /proc entry is its effective uid).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("xvtpmd-sandbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn vtpm(root: &Path, uuid: &str) {
        std::fs::create_dir_all(root.join(uuid).join("state")).expect("dir");
    }

    #[test]
    fn a_socket_directory_that_would_show_more_than_the_socket_is_refused() {
        let (state, snaps) = (Path::new("/var/lib/xvtpm/vtpms"), Path::new("/run/xvtpm/snapshots"));
        assert_eq!(check_socket_dir(Path::new("/run/xvtpm/mgr/vtpm.sock"), state, snaps), Ok(()));
        let old = check_socket_dir(Path::new("/run/xvtpm/mgr.sock"), state, snaps).expect_err("beside the snapshots");
        assert!(old.contains("snapshot-dir") && old.contains("/run/xvtpm/mgr/vtpm.sock"), "{old}");
        assert!(check_socket_dir(Path::new("/var/lib/xvtpm/vtpms/mgr.sock"), state, snaps).is_err());
    }

    #[test]
    fn each_vtpm_gets_its_own_uid_and_keeps_it() {
        if !is_root() {
            eprintln!("not root: uids cannot be given; nothing checked");
            return;
        }
        let r = root("alloc");
        let s = Sandboxing { uid_base: 0x7000_1000, uid_count: 2, group: None };
        let (a, b, c) = (
            "00000000-0000-4000-8000-00000000000a",
            "00000000-0000-4000-8000-00000000000b",
            "00000000-0000-4000-8000-00000000000c",
        );
        for u in [a, b, c] {
            vtpm(&r, u);
        }
        let ua = s.uid_for(&r, a, None).expect("a");
        let ub = s.uid_for(&r, b, None).expect("b");
        assert_ne!(ua, ub, "two vTPMs never share a uid");
        assert_eq!(s.uid_for(&r, a, None).expect("a again"), ua, "kept");
        let full = s.uid_for(&r, c, None).expect_err("the range is used up");
        assert!(full.contains("in use"), "{full}");
        // A copied directory with another vTPM's owner gets a uid of its own.
        std::fs::remove_dir_all(r.join(b)).expect("rm");
        vtpm(&r, b);
        std::os::unix::fs::lchown(r.join(b).join("state"), Some(ua), None).expect("chown");
        let ub2 = s.uid_for(&r, b, None).expect("b again");
        assert_ne!(ub2, ua);
        let _ = std::fs::remove_dir_all(r);
    }
}
