//! The crate's one error type.

use std::path::PathBuf;

/// Errors of the vTPM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtpms returned an error code (a `TPM_RESULT`).
    #[error("libtpms: {op} failed with TPM_RESULT {rc:#x}")]
    Tpm {
        /// What was being done.
        op: &'static str,
        /// The code, as the swtpm control protocol reports it.
        rc: u32,
    },
    /// The TPM is not powered on (or is, when it must not be).
    #[error("TPM is {0}")]
    PowerState(&'static str),
    /// Another libtpms TPM already exists in this process.
    #[error("libtpms already runs a TPM in this process (one TPM per process)")]
    AlreadyInUse,
    /// A state file cannot be used: it does not authenticate, does not decrypt, is truncated,
    /// or belongs to another blob. The vTPM refuses to start rather than replace it.
    #[error("state file {path}: {reason}")]
    StateCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// There is no state and creating a new TPM was not asked for.
    #[error("no TPM state in {0}; create one explicitly (`vtpm create`); a vTPM never starts over on its own")]
    NoState(PathBuf),
    /// The key file is missing or malformed.
    #[error("key file {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error with context.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A client broke the protocol it speaks.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A bad argument or configuration.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
