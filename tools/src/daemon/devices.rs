//! The vtpm devices xenstore gives this domain: every `backend/vtpm/<frontend>/<handle>` that
//! is online, with the uuid libxl wrote.

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
}

/// The online devices under `backend/vtpm` of domain `me`. A device going away (offline, or
/// its directory removed) is simply not listed.
pub fn list(xs: &Xenstore, me: DomId) -> Vec<Device> {
    let root = vtpm_backend_root(me);
    let dir = |p: &str| xs.directory(TxId::NONE, p).unwrap_or_default();
    let mut out = Vec::new();
    for fe in dir(&root) {
        let Ok(frontend) = fe.parse::<DomId>() else { continue };
        for h in dir(&format!("{root}/{fe}")) {
            let Ok(handle) = h.parse::<u32>() else { continue };
            let be_path = format!("{root}/{fe}/{h}");
            let read = |k: &str| xs.try_read(TxId::NONE, &format!("{be_path}/{k}")).ok().flatten();
            if read("online").as_deref() == Some(b"0") {
                continue;
            }
            let uuid = match read("uuid") {
                None => Err("no uuid in the backend directory".to_string()),
                Some(raw) => parse_uuid(&format!("{be_path}/uuid"), &raw).map_err(|e| e.to_string()),
            };
            out.push(Device { frontend, handle, uuid, be_path });
        }
    }
    out
}
