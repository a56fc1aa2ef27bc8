//! The vtpm devices xenstore gives this domain: every `backend/vtpm/<frontend>/<handle>`
//! directory, with the uuid libxl wrote; and closing one that will not be served.

use xvtpm_xen::xenbus::{parse_uuid, vtpm_backend_root};
use xvtpm_xen::{DomId, TxId, Xenstore};

/// One device the toolstack made for this domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The guest's domain id.
    pub frontend: DomId,
    /// The device's handle in the guest.
    pub handle: u32,
    /// The vTPM's uuid (lower case), or why it has none usable.
    pub uuid: Result<String, String>,
    /// Its backend directory.
    pub be_path: String,
}

impl Device {
    /// How the log names it.
    pub fn name(&self) -> String {
        format!("guest {} vtpm {}", self.frontend, self.handle)
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
            out.push(Device { frontend, handle, uuid, be_path });
        }
    }
    Ok(out)
}

/// Closes a device nobody will serve (Closed), with the reason where the toolstack (and the
/// guest) can read it: `why` must not name host paths.
pub fn refuse(xs: &Xenstore, d: &Device, why: &str) {
    let be = &d.be_path;
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

/// For a refused device the toolstack takes down, what its backend would do: Closed again
/// after the toolstack's Closing, and in a driver domain (`me` not 0) the directory removed
/// once it is offline, as `xl devd` does.
pub fn answer_removal(xs: &Xenstore, d: &Device, me: DomId) {
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
