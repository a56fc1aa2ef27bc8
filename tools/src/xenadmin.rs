//! The admin channel to a manager in its own domain: a vtpm device this tool makes for itself
//! (as libxl would, but with its frontend directory at `device/xvtpm-admin/<handle>`, where
//! the kernel's xen-tpmfront does not look), speaks to through a user-space tpmfront, and
//! removes when done. The manager takes management commands on it because its frontend is
//! the domain it was told to trust (`vtpmmgr serve --admin-domain 0`). Each device records the
//! tool's pid (`xvtpm-pid`), so a later tool removes the device of one that was killed.

use std::time::Duration;

use anyhow::{bail, Context};
use xvtpm_frontend::{Frontend, FrontendConfig};
use xvtpm_vtpmmgr::admin::AdminLink;
use xvtpm_xen::xenbus::{domain_path, vtpm_backend_root};
use xvtpm_xen::{toolstack, DomId, TxId, Xen, Xenstore};

/// Handles of the tool's devices start here, clear of the small ones libxl gives.
const FIRST_HANDLE: u32 = 1000;

/// How long the manager may take to connect, or to let go of the device.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The id of the domain named `name` (or `name` itself, when it is a number).
pub fn domain_id(xs: &Xenstore, name: &str) -> anyhow::Result<DomId> {
    if let Ok(id) = name.parse::<DomId>() {
        return Ok(id);
    }
    for d in xs.directory(TxId::NONE, "/local/domain").context("list the domains in xenstore")? {
        let Ok(id) = d.parse::<DomId>() else { continue };
        if xs.try_read(TxId::NONE, &format!("{}/name", domain_path(id)))?.as_deref() == Some(name.as_bytes()) {
            return Ok(id);
        }
    }
    bail!("no domain named {name:?} (is the manager's domain running? see `xl list`)")
}

/// The key of an admin device's frontend directory that holds its tool's pid.
pub const PID_KEY: &str = "xvtpm-pid";

/// Removes the admin devices whose tool is gone (killed before it could remove its own).
/// Devices of running tools, and any without a pid, are left alone.
fn remove_stale(xs: &Xenstore, fe_root: &str, me: DomId) {
    let Ok(handles) = xs.directory(TxId::NONE, fe_root) else { return };
    for h in handles {
        let dir = format!("{fe_root}/{h}");
        let read = |k: &str| xs.try_read(TxId::NONE, &format!("{dir}/{k}")).ok().flatten();
        let num = |k: &str| read(k).and_then(|v| String::from_utf8(v).ok()).and_then(|v| v.trim().parse::<u32>().ok());
        let (Some(pid), Some(backend), Ok(handle)) = (num(PID_KEY), num("backend-id"), h.parse::<u32>()) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let Ok(backend) = DomId::try_from(backend) else { continue };
        log::warn!("removing the admin device {dir}: the tool that made it (pid {pid}) is gone");
        if let Err(e) = toolstack::remove_vtpm_at(xs, &dir, me, backend, handle, Duration::from_secs(2)) {
            log::warn!("removing {dir}: {e}");
        }
    }
}

/// Whether process `pid` of this domain exists (a zombie counts as gone).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()), Some('Z' | 'X')),
        Err(_) => false,
    }
}

/// A vtpm device from this domain to the manager's, connected.
#[derive(Debug)]
pub struct XenAdminLink {
    fe: Option<Frontend>,
    xs: Xenstore,
    fe_dir: String,
    me: DomId,
    manager: DomId,
    handle: u32,
}

impl XenAdminLink {
    /// Makes the device and connects it to the manager's domain `manager` (a name or an id).
    pub fn open(xen: &dyn Xen, manager: &str) -> anyhow::Result<Self> {
        let xs = xen.xenstore()?;
        let mgr = domain_id(&xs, manager)?;
        let me = xen.domid();
        if mgr == me {
            bail!("the manager's domain is this one: use its admin socket (--admin-socket)");
        }
        let fe_root = format!("{}/device/xvtpm-admin", domain_path(me));
        remove_stale(&xs, &fe_root, me);
        let be_root = format!("{}/{me}", vtpm_backend_root(mgr));
        let uuid = xvtpm_proto::Uuid::from_random(rand::random()).to_string();
        // The handle is picked and the device made in one transaction: two tools at once
        // never share a device.
        let (handle, fe_dir) = xs
            .transaction(|tx| {
                let list = |p: &str| match xs.directory(tx, p) {
                    Err(e) if e.is_enoent() => Ok(Vec::new()),
                    r => r,
                };
                let used: Vec<String> = [list(&fe_root)?, list(&be_root)?].concat();
                let handle = (FIRST_HANDLE..).find(|h| !used.contains(&h.to_string())).unwrap_or(FIRST_HANDLE);
                let fe_dir = format!("{fe_root}/{handle}");
                toolstack::add_vtpm_at(&xs, tx, &fe_dir, me, mgr, handle, &uuid)?;
                xs.write(tx, &format!("{fe_dir}/{PID_KEY}"), std::process::id().to_string().as_bytes())?;
                Ok((handle, fe_dir))
            })
            .with_context(|| format!("make a vtpm device to domain {mgr} in xenstore (is this dom0?)"))?;
        log::debug!("admin device {fe_dir} to domain {mgr}");
        let mut link = Self { fe: None, xs, fe_dir, me, manager: mgr, handle };
        let cfg = FrontendConfig {
            handle,
            dir: Some(link.fe_dir.clone()),
            connect_timeout: CONNECT_TIMEOUT,
            ..FrontendConfig::default()
        };
        let fe = Frontend::connect(xen, cfg).with_context(|| {
            format!("connect to the manager in domain {mgr} (does it serve --xen with --admin-domain {me}?)")
        })?;
        link.fe = Some(fe);
        Ok(link)
    }
}

impl AdminLink for XenAdminLink {
    fn exchange(&mut self, request: &[u8]) -> xvtpm_vtpmmgr::Result<Vec<u8>> {
        let fe = self.fe.as_mut().ok_or_else(|| xvtpm_vtpmmgr::Error::Protocol("not connected".into()))?;
        fe.transmit(request).map_err(|e| xvtpm_vtpmmgr::Error::Protocol(format!("manager over tpmfront: {e}")))
    }
}

impl Drop for XenAdminLink {
    fn drop(&mut self) {
        if let Some(fe) = self.fe.take() {
            if let Err(e) = fe.close() {
                log::warn!("closing the admin device {}: {e}", self.fe_dir);
            }
        }
        match toolstack::remove_vtpm_at(&self.xs, &self.fe_dir, self.me, self.manager, self.handle, CONNECT_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => log::warn!("the manager did not let go of {} in time; removed it anyway", self.fe_dir),
            Err(e) => log::warn!("removing the admin device {}: {e}", self.fe_dir),
        }
    }
}
