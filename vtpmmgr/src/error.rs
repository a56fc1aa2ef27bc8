//! The crate's one error type.

/// Errors of the manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store is damaged: a block or root that does not authenticate, a broken tree.
    #[error("store {store}: {why}")]
    Corrupt {
        /// The store's name.
        store: String,
        /// What does not check out.
        why: String,
    },
    /// The store is older than the hardware counter says it must be: an old copy.
    #[error(
        "store {store} is an old copy (rollback): its counter is {found}, the TPM's is {hw}. If no old copy \
         was put in its place, something else incremented the counter: `vtpmmgr recover` accepts the TPM's value"
    )]
    Rollback {
        /// The store's name.
        store: String,
        /// The counter bound into the store's newest valid root.
        found: u64,
        /// The hardware counter.
        hw: u64,
    },
    /// The store cannot be used (full, in use, wrong size).
    #[error("store: {0}")]
    Store(String),
    /// The hardware TPM refused or failed an operation.
    #[error("hardware TPM: {0}")]
    Tpm(String),
    /// The hardware TPM answered a command with an error code.
    #[error("hardware TPM: {what} failed with rc {rc:#x}")]
    TpmRc {
        /// The command.
        what: String,
        /// Its response code.
        rc: u32,
    },
    /// A vTPM the manager does not know (not provisioned).
    #[error("vTPM {0} is not provisioned")]
    UnknownVtpm(String),
    /// A vTPM that exists already (provisioned or imported twice).
    #[error("{0}")]
    Exists(String),
    /// No such group.
    #[error("no {0}")]
    NotFound(String),
    /// A provisioned vTPM that never saved a state key.
    #[error("vTPM {0} has no saved state key yet")]
    NoSavedState(String),
    /// A client that is not allowed to act for a vTPM.
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// The hardware TPM's driver failed.
    #[error(transparent)]
    Driver(#[from] xvtpm_tis::Error),
    /// A malformed manager request.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A vTPM asked for more than its share (GET_QUOTE's rate limit): try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// The anti-rollback counter is gone, or no longer takes the store's authorization (its
    /// index was undefined, and perhaps defined again by someone else).
    #[error("{0}")]
    CounterLost(String),
    /// The manager stopped serving: the hardware counter moved under it.
    #[error("the manager stopped serving: {0}")]
    Halted(String),
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
