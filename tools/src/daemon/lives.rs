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

use std::collections::HashMap;

use xvtpm_xen::xenbus::{domain_path, vtpm_frontend_path, GUEST_DOMAIN_KEY, GUEST_LIFE_KEY};
use xvtpm_xen::{DomId, TxId, Xen, Xenstore};

/// The watches: every domain's home, and domains' shutdowns. Events are filtered by
/// [`Lives::concerns`] before any read.
pub const WATCH: &str = "/local/domain";
/// xenstored's event for a domain that shut down or went.
pub const RELEASE: &str = "@releaseDomain";

/// What was written, so an unchanged value is not written again (each write wakes the watch).
#[derive(Debug, Default)]
pub struct Lives {
    written: HashMap<String, (String, Option<u32>)>,
}

impl Lives {
    /// Whether a change at `path` may change a device's life: a domain's coming or going, its
    /// `vm` node, or a vtpm device's directory on either side. Our own domain's backends read
    /// the lives themselves.
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
            (Some("device"), Some("vtpm")) => true,
            _ => false,
        }
    }

    /// Writes the life of every guest whose vtpm device is served by a domain other than `me`
    /// into that device's backend directory, where it changed. A device whose two sides do not
    /// name each other is skipped: the guest writes one, the backend domain the other, and
    /// neither alone may have a life written somewhere else.
    pub fn sync(&mut self, xs: &Xenstore, xen: &dyn Xen, me: DomId) -> xvtpm_xen::Result<()> {
        let dir = |p: &str| match xs.directory(TxId::NONE, p) {
            Err(e) if e.is_enoent() => Ok(Vec::new()),
            r => r,
        };
        let read = |p: &str| -> xvtpm_xen::Result<Option<String>> {
            Ok(xs.try_read(TxId::NONE, p)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
        };
        let mut seen = HashMap::new();
        for be_dom in dir(WATCH)? {
            let Ok(be_id) = be_dom.parse::<DomId>() else { continue };
            if be_id == me {
                continue;
            }
            let root = format!("{}/backend/vtpm", domain_path(be_id));
            for fe in dir(&root)? {
                let Ok(fe_id) = fe.parse::<DomId>() else { continue };
                for h in dir(&format!("{root}/{fe}"))? {
                    let Ok(handle) = h.parse::<u32>() else { continue };
                    let be = format!("{root}/{fe}/{h}");
                    let fe_path = vtpm_frontend_path(fe_id, handle);
                    let agreed = read(&format!("{be}/frontend"))?.as_deref() == Some(fe_path.as_str())
                        && read(&format!("{fe_path}/backend"))?.as_deref() == Some(be.as_str());
                    if !agreed {
                        continue;
                    }
                    let Some(life) = life_of(xs, fe_id)? else { continue };
                    let domain = match xen.domain_info(fe_id) {
                        Ok(d) => d.map(|d| d.to_flags()),
                        Err(e) => {
                            log::warn!("cannot ask Xen about domain {fe_id}: {e}");
                            None
                        }
                    };
                    let now = (life, domain);
                    if self.written.get(&be) != Some(&now) {
                        let (life, domain) = &now;
                        if write_notes(xs, &be, life, *domain)? {
                            let said = domain.map(xvtpm_xen::DomainInfo::from_flags);
                            log::info!(
                                "guest {fe_id} vtpm {handle} (served by domain {be_id}): its life is {life}, {}",
                                said.map_or("gone".to_string(), |d| d.to_string())
                            );
                        }
                    }
                    seen.insert(be, now);
                }
            }
        }
        self.written = seen;
        Ok(())
    }
}

/// A domain's life as a backend in dom0 reads it: `<vm>@<start_time>`.
fn life_of(xs: &Xenstore, domid: DomId) -> xvtpm_xen::Result<Option<String>> {
    let Some(vm) = xs.try_read(TxId::NONE, &format!("{}/vm", domain_path(domid)))? else { return Ok(None) };
    let vm = String::from_utf8_lossy(&vm).into_owned();
    Ok(Some(match xs.try_read(TxId::NONE, &format!("{vm}/start_time"))? {
        Some(s) => format!("{vm}@{}", String::from_utf8_lossy(&s)),
        None => vm,
    }))
}

/// Writes `life` and the domain's flags (if Xen knows the domain) into the backend directory
/// `be` if the directory is still there (a write would make a removed one again) and a value
/// differs. Whether it wrote.
fn write_notes(xs: &Xenstore, be: &str, life: &str, domain: Option<u32>) -> xvtpm_xen::Result<bool> {
    let life_key = format!("{be}/{GUEST_LIFE_KEY}");
    let domain_key = format!("{be}/{GUEST_DOMAIN_KEY}");
    let flags = domain.map(|f| f.to_string());
    xs.transaction(|tx| {
        if xs.try_read(tx, &format!("{be}/frontend"))?.is_none() {
            return Ok(false);
        }
        let mut wrote = false;
        if xs.try_read(tx, &life_key)?.as_deref() != Some(life.as_bytes()) {
            xs.write(tx, &life_key, life.as_bytes())?;
            wrote = true;
        }
        if let Some(f) = &flags {
            if xs.try_read(tx, &domain_key)?.as_deref() != Some(f.as_bytes()) {
                xs.write(tx, &domain_key, f.as_bytes())?;
                wrote = true;
            }
        }
        Ok(wrote)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_that_can_change_a_life_concern_it() {
        for p in [
            "@releaseDomain",
            "/local/domain",
            "/local/domain/7",
            "/local/domain/7/vm",
            "/local/domain/3/backend/vtpm/7/0",
            "/local/domain/3/backend/vtpm/7/0/state",
            "/local/domain/7/device/vtpm/0/state",
        ] {
            assert!(Lives::concerns(p, 0), "{p}");
        }
        for p in [
            "/local/domain/0/backend/vtpm/7/0/state",
            "/local/domain/7/memory/target",
            "/local/domain/3/backend/vbd/7/51712/state",
            "/local/domain/7/device/vif/0/state",
            "/local/domainx/7",
            "/vm/abc/start_time",
        ] {
            assert!(!Lives::concerns(p, 0), "{p}");
        }
    }
}
