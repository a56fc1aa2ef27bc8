//! What `xvtpmd` tells `xvtpm status`: a JSON file it rewrites (atomically) whenever a vTPM
//! starts, stops or fails.

use std::path::Path;

use serde::{Deserialize, Serialize};
use xvtpm_xen::DomId;

/// Where `xvtpmd` writes it by default.
pub const DEFAULT_PATH: &str = "/run/xvtpm/xvtpmd.json";

/// What `xvtpm status` shows of one vTPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The vTPM's uuid.
    pub uuid: String,
    /// The guest's domain id.
    pub guest: DomId,
    /// The device handle in the guest (0 for an HVM guest's TPM).
    pub handle: u32,
    /// An HVM guest's TPM (its registers, served beside its device model), not a vtpm device.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hvm: bool,
    /// `running`, `restarting` or `refused`.
    pub state: String,
    /// The vtpm's pid while it runs.
    pub pid: Option<u32>,
    /// When it was last (re)started (seconds since the Unix epoch), while it runs.
    pub started_unix: Option<u64>,
    /// How often it was restarted.
    pub restarts: u32,
    /// The last thing that went wrong.
    pub last_error: Option<String>,
}

/// Writes `status` as JSON to `path` (replaced atomically).
#[allow(dead_code)] // The module is shared by both binaries; xvtpm only reads.
pub fn write(path: &Path, status: &[Status]) {
    let tmp = path.with_extension("tmp");
    let r = serde_json::to_vec_pretty(status)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        log::warn!("cannot write the status to {}: {e}", path.display());
    }
}

/// Reads what `xvtpmd` wrote last.
#[allow(dead_code)] // The module is shared by both binaries; xvtpmd only writes.
pub fn read(path: &Path) -> std::io::Result<Vec<Status>> {
    let b = std::fs::read(path)?;
    serde_json::from_slice(&b).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
