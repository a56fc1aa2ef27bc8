//! The crate's one error type.

use std::time::Duration;

/// Errors of tpmfront.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Xen interface failed.
    #[error(transparent)]
    Xen(#[from] xvtpm_xen::Error),
    /// The command does not fit the shared page.
    #[error("command of {len} bytes exceeds the tpmif maximum of {max} bytes")]
    CommandTooLarge {
        /// Length of the command.
        len: usize,
        /// Largest command the page carries.
        max: usize,
    },
    /// The backend did not answer in time; the command was cancelled.
    #[error("no response within {0:?}; the command was cancelled")]
    Timeout(Duration),
    /// The backend cancelled the command (state IDLE instead of FINISH).
    #[error("the backend cancelled the command")]
    Cancelled,
    /// The backend did not reach Connected.
    #[error("backend at {path} did not connect: {reason}")]
    NotConnected {
        /// Backend directory.
        path: String,
        /// What happened instead.
        reason: String,
    },
    /// The backend broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
