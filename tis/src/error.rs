//! The crate's one error type.

use std::time::Duration;

/// Errors of the hardware TPM driver. Every way a TPM can misbehave ends in one of these,
/// within the timeout that applies, never in a hang.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The locality number is outside 0..=4, or the transport cannot select it.
    #[error("locality {locality}: {why}")]
    Locality {
        /// The locality asked for.
        locality: u8,
        /// Why it cannot be used.
        why: &'static str,
    },
    /// The TPM did not make the locality active within timeout A.
    #[error("TPM did not grant locality {locality} within {waited:?}")]
    LocalityNotGranted {
        /// The locality asked for.
        locality: u8,
        /// How long we waited.
        waited: Duration,
    },
    /// The TPM did not become ready for a command (commandReady / cmdReady) within timeout B.
    #[error("TPM did not become ready for a command within {0:?}")]
    NotReady(Duration),
    /// burstCount stayed 0 for longer than timeout D while bytes had to move.
    #[error("TPM kept burstCount at 0 for {0:?}")]
    BurstCountZero(Duration),
    /// stsValid never came on within timeout C, so the status could not be trusted.
    #[error("TPM status never became valid within {0:?}")]
    StatusNotValid(Duration),
    /// The TPM's Expect bit disagrees with the command's length: it stopped expecting before
    /// the last byte, or still expects more after it.
    #[error("TPM {what} after {sent} of {total} command bytes")]
    ExpectMismatch {
        /// "stopped expecting data" or "still expects data".
        what: &'static str,
        /// Bytes written so far.
        sent: usize,
        /// The command's length.
        total: usize,
    },
    /// The command did not complete within its duration; it was cancelled.
    #[error("TPM command {ordinal:#x} did not complete within {waited:?} (cancelled)")]
    CommandTimeout {
        /// The command's ordinal.
        ordinal: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// The command is larger than the TPM's buffer, or shorter than a header.
    #[error("command of {size} bytes: {why}")]
    BadCommand {
        /// The command's length.
        size: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The response header's size field is below a header or above the buffer.
    #[error("TPM response claims {claimed} bytes; allowed {min}..={max}")]
    ResponseSize {
        /// The size field.
        claimed: u64,
        /// The smallest valid response (a header).
        min: usize,
        /// The largest response we accept.
        max: usize,
    },
    /// The TPM delivered fewer bytes than its header claims.
    #[error("TPM response ended after {got} of the {claimed} bytes its header claims")]
    ResponseShort {
        /// Bytes received.
        got: usize,
        /// The header's size field.
        claimed: usize,
    },
    /// The TPM still has data after the number of bytes its header claims.
    #[error("TPM response has more data than the {claimed} bytes its header claims")]
    ResponseLong {
        /// The header's size field.
        claimed: usize,
    },
    /// The CRB reports a fatal error (CTRL_STS.tpmSts).
    #[error("CRB reports a fatal TPM error (CTRL_STS {0:#x})")]
    CrbFatal(u32),
    /// The CRB's command or response buffer is unusable (outside the mapped window, too small).
    #[error("CRB buffers: {0}")]
    CrbBuffer(String),
    /// No TPM interface was recognised at the MMIO window.
    #[error("no TPM interface found: {0}")]
    NoDevice(String),
    /// An operating-system call failed (/dev/mem, /dev/tpmrm0, sockets).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A peer (swtpm's control channel) answered something unexpected.
    #[error("{0}")]
    Protocol(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
