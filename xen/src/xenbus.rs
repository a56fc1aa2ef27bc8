//! Xenbus device states and the xenstore paths of vtpm devices.

use crate::{DomId, Error, Result};

/// `enum xenbus_state` from Xen's `io/xenbus.h`.
// The states are io/xenbus.h's; only those whose meaning here is specific are documented.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum XenbusState {
    Unknown = 0,
    Initialising = 1,
    /// The backend is ready for the frontend to publish its details.
    InitWait = 2,
    /// The frontend has published ring-ref and event-channel.
    Initialised = 3,
    Connected = 4,
    Closing = 5,
    Closed = 6,
    Reconfiguring = 7,
    Reconfigured = 8,
}

impl XenbusState {
    /// Parses a state number; `None` for values outside the enum.
    pub fn from_u32(v: u32) -> Option<Self> {
        use XenbusState::*;
        Some(match v {
            0 => Unknown,
            1 => Initialising,
            2 => InitWait,
            3 => Initialised,
            4 => Connected,
            5 => Closing,
            6 => Closed,
            7 => Reconfiguring,
            8 => Reconfigured,
            _ => return None,
        })
    }

    /// Parses the decimal string stored in a `state` node.
    pub fn parse(path: &str, raw: &[u8]) -> Result<Self> {
        let s = String::from_utf8_lossy(raw);
        s.trim()
            .parse::<u32>()
            .ok()
            .and_then(Self::from_u32)
            .ok_or_else(|| Error::Malformed { path: path.to_string(), value: s.into_owned() })
    }

    /// The string written to a `state` node.
    pub fn as_str(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"][self as usize]
    }
}

/// `/local/domain/<domid>`.
pub fn domain_path(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

/// The directory under which a backend domain finds its vtpm devices:
/// `/local/domain/<be>/backend/vtpm`.
pub fn vtpm_backend_root(backend: DomId) -> String {
    format!("/local/domain/{backend}/backend/vtpm")
}

/// The backend directory of one device: `/local/domain/<be>/backend/vtpm/<fe>/<handle>`.
pub fn vtpm_backend_path(backend: DomId, frontend: DomId, handle: u32) -> String {
    format!("/local/domain/{backend}/backend/vtpm/{frontend}/{handle}")
}

/// The key of a vtpm device's backend directory where dom0's `xvtpmd` writes the frontend
/// domain's life (its `vm` path `@` that path's `start_time`) for a backend in another domain,
/// which may not read them itself. Only the toolstack's domain and the backend's may write
/// there (libxl makes the backend domain the directory's owner, the guest a reader).
pub const GUEST_LIFE_KEY: &str = "xvtpm-guest-life";

/// Beside [`GUEST_LIFE_KEY`]: what the hypervisor last said of the frontend domain, as
/// `XEN_DOMCTL_getdomaininfo`'s flags in decimal (`XEN_DOMINF_*`: shut down, why, dying),
/// written by dom0's `xvtpmd` at each `@releaseDomain`, so that a backend in another domain
/// can tell a guest's suspend (`xl save`) from its reboot.
pub const GUEST_DOMAIN_KEY: &str = "xvtpm-guest-domain";

/// Where the HVM device-model wrapper asks dom0's xvtpmd for an HVM guest's TPM: one
/// directory per guest domain, `<root>/<domid>`, holding [`HVM_UUID_KEY`], [`HVM_VERSION_KEY`] and [`HVM_INCOMING_KEY`] (the wrapper's),
/// [`HVM_STATE_KEY`] and [`HVM_ERROR_KEY`] (xvtpmd's and the vtpm's), [`HVM_SERVER_KEY`] (the
/// vtpm's), [`HVM_ARRIVED_KEY`] (`xvtpm migrate-accept`'s). Under dom0's own directory: only dom0 may write there.
pub const HVM_REQUEST_ROOT: &str = "/local/domain/0/xvtpm-hvm";
/// The vTPM's uuid (the domain's own uuid).
pub const HVM_UUID_KEY: &str = "uuid";
/// The TPM version the wrapper asks for if the vTPM is made now: `1.2` or `2.0` (absent: the
/// daemon's default). A vTPM that exists keeps the version it was made with.
pub const HVM_VERSION_KEY: &str = "tpm-version";
/// `1` when the device model restores a saved guest (`xl restore`, the receiving end of
/// `xl migrate`: QEMU's `-incoming`): the guest runs on, so its TPM is not a new platform's.
pub const HVM_INCOMING_KEY: &str = "incoming";
/// `requested` (the wrapper), `ready` (the vtpm serves the registers), `refused` (xvtpmd),
/// `arriving` (xvtpmd: a migration brings the vTPM; the wrapper starts the device model
/// without it, the guest staying paused until the migration has it served).
pub const HVM_STATE_KEY: &str = "state";
/// Written by `xvtpm migrate-accept` once an arriving vTPM is in place: xvtpmd starts it.
pub const HVM_ARRIVED_KEY: &str = "arrived";
/// Why a request was refused, for the wrapper to print into the device model's log.
pub const HVM_ERROR_KEY: &str = "error";
/// The id of the ioreq server serving the registers, for a restarted vtpm to take over.
pub const HVM_SERVER_KEY: &str = "ioreq-server";

/// The request directory of HVM guest `domid`.
pub fn hvm_request_path(domid: DomId) -> String {
    format!("{HVM_REQUEST_ROOT}/{domid}")
}

/// The frontend directory of one device: `/local/domain/<fe>/device/vtpm/<handle>`.
pub fn vtpm_frontend_path(frontend: DomId, handle: u32) -> String {
    format!("/local/domain/{frontend}/device/vtpm/{handle}")
}

/// Parses a decimal xenstore value as a number of type `T`.
pub fn parse_num<T: std::str::FromStr>(path: &str, raw: &[u8]) -> Result<T> {
    let s = String::from_utf8_lossy(raw);
    s.trim().parse::<T>().map_err(|_| Error::Malformed { path: path.to_string(), value: s.into_owned() })
}

/// Checks that `s` is a canonical textual UUID (8-4-4-4-12 hex digits), as libxl writes it,
/// and returns it in lower case.
pub fn parse_uuid(path: &str, raw: &[u8]) -> Result<String> {
    let s = String::from_utf8_lossy(raw);
    match xvtpm_proto::Uuid::parse(&s) {
        Ok(u) => Ok(u.to_string()),
        Err(_) => Err(Error::Malformed { path: path.to_string(), value: s.into_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_roundtrip_and_reject_garbage() {
        for v in 0..=8u32 {
            let s = XenbusState::from_u32(v).expect("valid");
            assert_eq!(XenbusState::parse("p", s.as_str().as_bytes()).expect("parse"), s);
        }
        assert!(XenbusState::parse("p", b"9").is_err());
        assert!(XenbusState::parse("p", b"-1").is_err());
        assert!(XenbusState::parse("p", b"four").is_err());
        assert!(XenbusState::parse("p", b"").is_err());
    }

    #[test]
    fn uuid_validation() {
        let u = "B26D206A-e6b7-11f1-a656-51586a2e1b82";
        assert_eq!(parse_uuid("p", u.as_bytes()).expect("uuid"), u.to_ascii_lowercase());
        for bad in [
            "",
            "b26d206a",
            "b26d206a-e6b7-11f1-a656-51586a2e1b8",
            "g26d206a-e6b7-11f1-a656-51586a2e1b82",
            "b26d206ae-6b7-11f1-a656-51586a2e1b82",
        ] {
            assert!(parse_uuid("p", bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert_eq!(vtpm_backend_path(0, 3, 0), "/local/domain/0/backend/vtpm/3/0");
        assert_eq!(vtpm_frontend_path(3, 1), "/local/domain/3/device/vtpm/1");
    }
}
