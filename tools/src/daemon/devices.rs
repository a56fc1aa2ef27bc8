//! The vtpm devices xenstore gives this domain: every `backend/vtpm/<frontend>/<handle>`
//! directory, with the uuid libxl wrote, and in dom0 every HVM guest's TPM request (the
//! `xvtpm-qemu-dm` wrapper's); and closing one that will not be served.

use xvtpm_xen::xenbus::{
    hvm_request_path, parse_uuid, vtpm_backend_root, HVM_ERROR_KEY, HVM_INCOMING_KEY, HVM_REQUEST_ROOT, HVM_STATE_KEY,
    HVM_UUID_KEY, HVM_VERSION_KEY,
};
use xvtpm_xen::{DomId, ShutdownReason, TxId, Xen, Xenstore};

/// The handle of an HVM guest's TPM: its registers, not a vtpm device.
pub const HVM_HANDLE: u32 = u32::MAX;

/// One device the toolstack made for this domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The guest's domain id.
    pub frontend: DomId,
    /// The device's handle in the guest.
    pub handle: u32,
    /// The vTPM's uuid (lower case), or why it has none usable.
    pub uuid: Result<String, String>,
    /// Its backend directory (an HVM guest's: its request directory).
    pub be_path: String,
    /// The TPM version asked for, if the vTPM is made for it (HVM guests' wrappers ask).
    pub tpm12: Option<bool>,
    /// An HVM guest's domain is suspended (`xl save`, `xl migrate`): its vtpm is told, since
    /// in its sandbox it cannot ask Xen.
    pub suspended: bool,
    /// An HVM guest that arrives (`xl restore`, the receiving end of a migration): it runs
    /// on, so no vTPM is made for it.
    pub incoming: bool,
}

impl Device {
    /// How the log names it.
    pub fn name(&self) -> String {
        if self.is_hvm() {
            format!("HVM guest {}", self.frontend)
        } else {
            format!("guest {} vtpm {}", self.frontend, self.handle)
        }
    }

    /// An HVM guest's TPM registers (served by `vtpm serve-hvm`).
    pub fn is_hvm(&self) -> bool {
        self.handle == HVM_HANDLE
    }

    /// Its (frontend, handle).
    pub fn key(&self) -> (DomId, u32) {
        (self.frontend, self.handle)
    }
}

/// Every device directory under `backend/vtpm` of domain `me`. A device stays listed while
/// the toolstack takes it down (offline, Closing): its vtpm answers that (Closed, and in a
/// driver domain the directory's removal), and only then goes. An error reading xenstore is
/// an error, never "no devices".
pub fn list(xs: &Xenstore, me: DomId) -> xvtpm_xen::Result<Vec<Device>> {
    let root = vtpm_backend_root(me);
    let dir = |p: &str| match xs.directory(TxId::NONE, p) {
        Err(e) if e.is_enoent() => Ok(Vec::new()),
        r => r,
    };
    let mut out = Vec::new();
    for fe in dir(&root)? {
        let Ok(frontend) = fe.parse::<DomId>() else { continue };
        for h in dir(&format!("{root}/{fe}"))? {
            let Ok(handle) = h.parse::<u32>() else { continue };
            let be_path = format!("{root}/{fe}/{h}");
            let uuid = match xs.try_read(TxId::NONE, &format!("{be_path}/uuid"))? {
                None => Err("no uuid in the backend directory".to_string()),
                Some(raw) => parse_uuid(&format!("{be_path}/uuid"), &raw).map_err(|e| e.to_string()),
            };
            out.push(Device { frontend, handle, uuid, be_path, tpm12: None, suspended: false, incoming: false });
        }
    }
    Ok(out)
}

/// Every HVM guest's TPM request (dom0 only) whose domain still runs. A request whose domain
/// is gone (or dying) is removed: its vtpm then stops, and a reboot's next domain asks anew.
pub fn list_hvm(xs: &Xenstore, xen: &dyn Xen) -> xvtpm_xen::Result<Vec<Device>> {
    let doms = match xs.directory(TxId::NONE, HVM_REQUEST_ROOT) {
        Err(e) if e.is_enoent() => return Ok(Vec::new()),
        r => r?,
    };
    let mut out = Vec::new();
    for d in doms {
        let Ok(frontend) = d.parse::<DomId>() else { continue };
        let be_path = hvm_request_path(frontend);
        let mut suspended = false;
        match xen.domain_info(frontend) {
            Ok(Some(info)) if !info.dying => suspended = info.shutdown == Some(ShutdownReason::Suspend),
            Ok(_) => {
                log::info!("HVM guest {frontend} is gone; its TPM request is removed");
                xs.try_rm(TxId::NONE, &be_path)?;
                continue;
            }
            // Unknown: kept, asked again at the next event.
            Err(e) => log::warn!("cannot ask about HVM guest {frontend}: {e}"),
        }
        let uuid = match xs.try_read(TxId::NONE, &format!("{be_path}/{HVM_UUID_KEY}"))? {
            // The wrapper writes the uuid and the state at once: not yet there is not asked yet.
            None => continue,
            Some(raw) => parse_uuid(&format!("{be_path}/{HVM_UUID_KEY}"), &raw).map_err(|e| e.to_string()),
        };
        let tpm12 = match xs.try_read(TxId::NONE, &format!("{be_path}/{HVM_VERSION_KEY}"))?.as_deref() {
            Some(b"1.2") => Some(true),
            Some(b"2.0") => Some(false),
            _ => None,
        };
        let incoming = xs.try_read(TxId::NONE, &format!("{be_path}/{HVM_INCOMING_KEY}"))?.as_deref() == Some(b"1");
        out.push(Device { frontend, handle: HVM_HANDLE, uuid, be_path, tpm12, suspended, incoming });
    }
    Ok(out)
}

/// Closes a device nobody will serve (Closed), with the reason where the toolstack (and the
/// guest) can read it: `why` must not name host paths. An HVM guest's request is answered
/// `refused`, which its wrapper prints and fails the domain's creation with.
pub fn refuse(xs: &Xenstore, d: &Device, why: &str) {
    let be = &d.be_path;
    if d.is_hvm() {
        let r = xs.transaction(|tx| {
            let state = xs.try_read(tx, &format!("{be}/{HVM_STATE_KEY}"))?;
            if state.is_none() {
                return Ok(());
            }
            xs.write(tx, &format!("{be}/{HVM_ERROR_KEY}"), why.as_bytes())?;
            // A guest served before stays `ready`: its next vtpm resumes it, never boots it.
            if state.as_deref() == Some(b"ready") {
                return Ok(());
            }
            xs.write(tx, &format!("{be}/{HVM_STATE_KEY}"), b"refused")
        });
        if let Err(e) = r {
            log::warn!("{}: cannot write the refusal to {be}: {e}", d.name());
        }
        return;
    }
    let r = xs.transaction(|tx| {
        if xs.try_read(tx, &format!("{be}/state"))?.is_none() {
            return Ok(());
        }
        xs.write(tx, &format!("{be}/error"), why.as_bytes())?;
        xs.write(tx, &format!("{be}/state"), CLOSED)
    });
    if let Err(e) = r {
        log::warn!("{}: cannot write the error to {be}: {e}", d.name());
    }
}

const CLOSED: &[u8] = b"6";

/// Tells an HVM guest's wrapper that its vTPM arrives by a migration: it starts the device
/// model without waiting (the guest stays paused until the migration has the vTPM served).
pub fn arriving(xs: &Xenstore, d: &Device) {
    let be = &d.be_path;
    let r = xs.transaction(|tx| {
        if xs.try_read(tx, &format!("{be}/{HVM_STATE_KEY}"))?.as_deref() != Some(b"requested") {
            return Ok(());
        }
        xs.write(tx, &format!("{be}/{HVM_STATE_KEY}"), b"arriving")
    });
    if let Err(e) = r {
        log::warn!("{}: cannot write `arriving` to {be}: {e}", d.name());
    }
}

/// For a refused device the toolstack takes down, what its backend would do: Closed again
/// after the toolstack's Closing, and in a driver domain (`me` not 0) the directory removed
/// once it is offline, as `xl devd` does.
pub fn answer_removal(xs: &Xenstore, d: &Device, me: DomId) {
    if d.is_hvm() {
        return;
    }
    let be = &d.be_path;
    let read = |k: &str| xs.try_read(TxId::NONE, &format!("{be}/{k}")).ok().flatten();
    if read("online").as_deref() != Some(b"0") {
        return;
    }
    if read("state").as_deref() == Some(b"5") {
        let _ = xs.write(TxId::NONE, &format!("{be}/state"), CLOSED);
    }
    if me != 0 {
        if let Err(e) = xs.try_rm(TxId::NONE, be) {
            log::warn!("{}: cannot remove {be}: {e}", d.name());
        }
    }
}
