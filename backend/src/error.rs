//! The crate's one error type.

use xvtpm_xen::DomId;

/// Errors of tpmback.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Xen interface failed.
    #[error(transparent)]
    Xen(#[from] xvtpm_xen::Error),
    /// A device's configuration or its frontend broke the protocol; the device was closed.
    #[error("vtpm device {frontend}/{handle}: {reason}")]
    Device {
        /// Frontend domain.
        frontend: DomId,
        /// Device handle.
        handle: u32,
        /// What was wrong.
        reason: String,
    },
    /// The backend's thread could not be started or ended badly.
    #[error("backend thread: {0}")]
    Thread(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
