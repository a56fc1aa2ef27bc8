//! Guests' lives for vTPMs served in other domains (vTPM stub domains, driver domains).
//!
//! A vtpm tells a guest's next life from a restart under the same one by the domain's `vm`
//! path and `start_time`, which xenstore lets only dom0 and the guest read. For a device whose
//! backend is another domain, dom0's xvtpmd writes them into the device's backend directory
//! ([`GUEST_LIFE_KEY`]), which libxl gives the backend domain to own and the guest to read
//! only: the guest cannot write its own life there, another guest cannot reach it. Beside it
//! goes what the hypervisor says of the guest's domain ([`GUEST_DOMAIN_KEY`]), renewed at each
//! `@releaseDomain`, so that the backend tells a suspend (`xl save`) from a reboot as a vtpm in
//! dom0 does by asking Xen.

use xvtpm_xen::xenbus::{domain_path, vtpm_frontend_path, GUEST_DOMAIN_KEY, GUEST_LIFE_KEY};
use xvtpm_xen::{DomId, TxId, Xen, Xenstore};

/// The watches: every domain's home, and domains' shutdowns. Events are filtered by
/// [`concerns`] before any read.
pub const WATCH: &str = "/local/domain";
/// xenstored's event for a domain that shut down or went.
pub const RELEASE: &str = "@releaseDomain";

/// Whether a change at `path` may change what a device's backend should be told: a domain's
/// coming or going, its `vm` node, a vtpm backend directory of another domain than `me`
/// (ours read the lives themselves), or a domain's shutdown. Nothing a guest writes (its
/// `device` directory is its own) concerns it, so a guest cannot make dom0 rescan.
pub fn concerns(path: &str, me: DomId) -> bool {
    if path == RELEASE {
        return true;
    }
    let Some(rest) = path.strip_prefix(WATCH) else { return false };
    if rest.is_empty() {
        return true;
    }
    let Some(rest) = rest.strip_prefix('/') else { return false };
    let mut parts = rest.split('/');
    let Some(dom) = parts.next() else { return true };
    match (parts.next(), parts.next()) {
        (None, _) | (Some("vm"), None) => true,
        (Some("backend"), Some("vtpm")) => dom.parse::<DomId>().is_ok_and(|d| d != me),
        _ => false,
    }
}

/// Where Linux says which boot of the host this is.
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// What the watch events since the last pass ask for, in host boot `boot`.
#[derive(Debug)]
pub struct Pending {
    dirty: bool,
    released: bool,
    boot: String,
}

impl Pending {
    /// A first pass: everything, as after a `@releaseDomain`.
    pub fn all(boot: String) -> Self {
        Pending { dirty: true, released: true, boot }
    }

    /// Takes note of a watch event at `path`.
    pub fn note(&mut self, path: &str, me: DomId) {
        if concerns(path, me) {
            self.dirty = true;
            self.released |= path == RELEASE;
        }
    }

    /// The pass asked for, if any. A failure waits for the next event (logged).
    pub fn run(&mut self, xs: &Xenstore, xen: &dyn Xen, me: DomId) {
        if self.dirty {
            if let Err(e) = sync(xs, xen, me, &self.boot, self.released) {
                log::warn!("cannot pass the guests' lives: {e}; will try at the next change");
            }
        }
        (self.dirty, self.released) = (false, false);
    }
}

/// Writes the life of every guest whose vtpm device is served by a domain other than `me`
/// into that device's backend directory, with what Xen says of the guest's domain, where
/// either changed; after a `@releaseDomain` (`released`) the latter is written again for a
/// domain that is shut down even if unchanged: a guest resumed in place (a checkpoint, which
/// xenstored does not announce) and suspended again looks the same, and its backend must hear
/// of each suspend. A device whose two sides do not name each other is skipped: the guest
/// writes one, the backend domain the other, and neither alone may have a life written
/// somewhere else. So is one whose guest serves vtpm devices itself (a vTPM domain, whose own
/// device leads to the manager, which has no use for it). One device's failure is logged and
/// the others are done.
pub fn sync(xs: &Xenstore, xen: &dyn Xen, me: DomId, boot: &str, released: bool) -> xvtpm_xen::Result<()> {
    let dir = |p: &str| match xs.directory(TxId::NONE, p) {
        Err(e) if e.is_enoent() => Ok(Vec::new()),
        r => r,
    };
    for be_dom in dir(WATCH)? {
        let Ok(be_id) = be_dom.parse::<DomId>() else { continue };
        if be_id == me {
            continue;
        }
        let root = format!("{}/backend/vtpm", domain_path(be_id));
        for fe in dir(&root)? {
            let Ok(fe_id) = fe.parse::<DomId>() else { continue };
            if !dir(&format!("{}/backend/vtpm", domain_path(fe_id)))?.is_empty() {
                continue;
            }
            for h in dir(&format!("{root}/{fe}"))? {
                let Ok(handle) = h.parse::<u32>() else { continue };
                if let Err(e) = tell(xs, xen, (be_id, fe_id, handle), boot, released) {
                    log::warn!("guest {fe_id} vtpm {handle} (served by domain {be_id}): cannot tell its life: {e}");
                }
            }
        }
    }
    Ok(())
}

/// [`sync`] of one device: (backend domain, frontend domain, handle).
fn tell(
    xs: &Xenstore,
    xen: &dyn Xen,
    (be_id, fe_id, handle): (DomId, DomId, u32),
    boot: &str,
    released: bool,
) -> xvtpm_xen::Result<()> {
    let read = |p: &str| -> xvtpm_xen::Result<Option<String>> {
        Ok(xs.try_read(TxId::NONE, p)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    };
    let be = format!("{}/backend/vtpm/{fe_id}/{handle}", domain_path(be_id));
    let fe_path = vtpm_frontend_path(fe_id, handle);
    let agreed = read(&format!("{be}/frontend"))?.as_deref() == Some(fe_path.as_str())
        && read(&format!("{fe_path}/backend"))?.as_deref() == Some(be.as_str());
    if !agreed {
        return Ok(());
    }
    let Some(life) = xvtpm_xen::toolstack::domain_life(xs, fe_id)? else { return Ok(()) };
    let life = in_boot(&life, boot);
    let domain = match xen.domain_info(fe_id) {
        Ok(d) => d,
        Err(e) => {
            log::warn!("cannot ask Xen about domain {fe_id}: {e}");
            None
        }
    };
    let again = released && domain.is_some_and(|d| d.shutdown.is_some());
    if write_notes(xs, &be, &life, domain.map(xvtpm_xen::DomainInfo::to_flags), again)? {
        log::info!(
            "guest {fe_id} vtpm {handle} (served by domain {be_id}): its life is {life}, {}",
            domain.map_or("gone".to_string(), |d| d.to_string())
        );
    }
    Ok(())
}

/// `life` (`<vm>@<start_time>`) with the host's boot in its `vm` part (`<vm>#<boot>@...`):
/// a vTPM domain's snapshots are on a disk, which outlives the host; a guest suspended before
/// a host reboot and booted afresh after it (its `vm` path fixed by its domain file) would
/// otherwise continue the saved TPM. Only a restore within the same host boot continues one,
/// as in dom0, whose snapshots are in memory.
fn in_boot(life: &str, boot: &str) -> String {
    match life.split_once('@') {
        Some((vm, start)) => format!("{vm}#{boot}@{start}"),
        None => format!("{life}#{boot}"),
    }
}

/// Writes `life` and the domain's flags (if Xen knows the domain) into the backend directory
/// `be` if the directory is still there (a write would make a removed one again) and a value
/// differs (the flags also if `again`). Whether it wrote.
fn write_notes(xs: &Xenstore, be: &str, life: &str, domain: Option<u32>, again: bool) -> xvtpm_xen::Result<bool> {
    let life_key = format!("{be}/{GUEST_LIFE_KEY}");
    let domain_key = format!("{be}/{GUEST_DOMAIN_KEY}");
    let flags = domain.map(|f| f.to_string());
    // What to write, given the nodes' values in `tx`.
    let stale = |tx: TxId| -> xvtpm_xen::Result<(bool, bool)> {
        let life_stale = xs.try_read(tx, &life_key)?.as_deref() != Some(life.as_bytes());
        let flags_stale = match &flags {
            Some(f) => again || xs.try_read(tx, &domain_key)?.as_deref() != Some(f.as_bytes()),
            None => false,
        };
        Ok((life_stale, flags_stale))
    };
    // Each pass looks at every device; most have nothing new: no transaction for them.
    if stale(TxId::NONE)? == (false, false) {
        return Ok(false);
    }
    xs.transaction(|tx| {
        if xs.try_read(tx, &format!("{be}/frontend"))?.is_none() {
            return Ok(false);
        }
        let (life_stale, flags_stale) = stale(tx)?;
        if life_stale {
            xs.write(tx, &life_key, life.as_bytes())?;
        }
        if let (true, Some(f)) = (flags_stale, &flags) {
            xs.write(tx, &domain_key, f.as_bytes())?;
        }
        Ok(life_stale || flags_stale)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_boot_is_part_of_the_vm_path_that_a_restore_keeps() {
        assert_eq!(in_boot("/vm/u@12.5", "b1"), "/vm/u#b1@12.5");
        assert_eq!(in_boot("/vm/u", "b1"), "/vm/u#b1");
    }

    #[test]
    fn only_paths_that_can_change_a_life_concern_it() {
        for p in [
            "@releaseDomain",
            "/local/domain",
            "/local/domain/7",
            "/local/domain/7/vm",
            "/local/domain/3/backend/vtpm/7/0",
            "/local/domain/3/backend/vtpm/7/0/state",
        ] {
            assert!(concerns(p, 0), "{p}");
        }
        for p in [
            "/local/domain/0/backend/vtpm/7/0/state",
            "/local/domain/7/memory/target",
            "/local/domain/3/backend/vbd/7/51712/state",
            "/local/domain/7/device/vif/0/state",
            "/local/domain/7/device/vtpm/0/state",
            "/local/domain/7/device/vtpm/0/backend",
            "/local/domainx/7",
            "/vm/abc/start_time",
        ] {
            assert!(!concerns(p, 0), "{p}");
        }
    }
}
