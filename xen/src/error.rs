//! The crate's one error type.

use std::io;

/// Errors of the Xen interfaces.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// xenstored answered a request with an error (`XS_ERROR`).
    #[error("xenstore: {op} {path:?}: {errno}")]
    Xenstore {
        /// Operation that failed (e.g. "read").
        op: &'static str,
        /// Path the operation was about ("" where none).
        path: String,
        /// The errno xenstored reported.
        errno: XsErrno,
    },
    /// A xenstore message broke the wire protocol (bad header, size, or payload).
    #[error("xenstore protocol: {0}")]
    XsProtocol(String),
    /// The connection to xenstored was closed.
    #[error("xenstore connection closed")]
    XsClosed,
    /// An event channel operation failed.
    #[error("event channel: {op} (port {port}): {source}")]
    Evtchn {
        /// Operation ("bind_interdomain", "notify", ...).
        op: &'static str,
        /// Port concerned (remote port for binds), 0 where none.
        port: u32,
        /// Underlying OS error.
        source: io::Error,
    },
    /// A grant could not be mapped, allocated or released.
    #[error("grant: {op} (domain {domid}, ref {gref}): {source}")]
    Grant {
        /// Operation ("map", "alloc", ...).
        op: &'static str,
        /// Foreign domain.
        domid: u16,
        /// Grant reference.
        gref: u32,
        /// Underlying OS error.
        source: io::Error,
    },
    /// The tpmif shared page holds something the protocol does not allow.
    #[error("tpmif: {0}")]
    Tpmif(String),
    /// An access outside a shared page.
    #[error("shared page access out of bounds: offset {offset}, len {len}")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
    },
    /// A xenstore value that should be a number, state or uuid was not.
    #[error("malformed value at {path}: {value:?}")]
    Malformed {
        /// Path read.
        path: String,
        /// What was there.
        value: String,
    },
    /// The simulated Xen refused or failed an operation.
    #[error("simulated xen: {0}")]
    Sim(String),
    /// Any other OS error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Underlying OS error.
        source: io::Error,
    },
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The xenstore errno, if this is a xenstore error reply.
    pub fn xs_errno(&self) -> Option<XsErrno> {
        match self {
            Error::Xenstore { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True for "no such node" from xenstore.
    pub fn is_enoent(&self) -> bool {
        self.xs_errno() == Some(XsErrno::ENOENT)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The error names of Xen's `xs_wire.h` (`xsd_errors[]`), the strings xenstored sends in an
/// `XS_ERROR` reply.
// The names are xs_wire.h's, spelled as xenstored sends them; each means what its errno does.
#[allow(clippy::upper_case_acronyms, missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XsErrno {
    EINVAL,
    EACCES,
    EEXIST,
    EISDIR,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EIO,
    ENOTEMPTY,
    ENOSYS,
    EROFS,
    EBUSY,
    EAGAIN,
    EISCONN,
    E2BIG,
    EPERM,
    /// A name xenstored sent that `xs_wire.h` does not list.
    Other,
}

impl XsErrno {
    /// Every known errno in `xsd_errors[]` order.
    pub const ALL: [XsErrno; 16] = [
        XsErrno::EINVAL,
        XsErrno::EACCES,
        XsErrno::EEXIST,
        XsErrno::EISDIR,
        XsErrno::ENOENT,
        XsErrno::ENOMEM,
        XsErrno::ENOSPC,
        XsErrno::EIO,
        XsErrno::ENOTEMPTY,
        XsErrno::ENOSYS,
        XsErrno::EROFS,
        XsErrno::EBUSY,
        XsErrno::EAGAIN,
        XsErrno::EISCONN,
        XsErrno::E2BIG,
        XsErrno::EPERM,
    ];

    /// The wire name ("ENOENT").
    pub fn name(self) -> &'static str {
        match self {
            XsErrno::EINVAL => "EINVAL",
            XsErrno::EACCES => "EACCES",
            XsErrno::EEXIST => "EEXIST",
            XsErrno::EISDIR => "EISDIR",
            XsErrno::ENOENT => "ENOENT",
            XsErrno::ENOMEM => "ENOMEM",
            XsErrno::ENOSPC => "ENOSPC",
            XsErrno::EIO => "EIO",
            XsErrno::ENOTEMPTY => "ENOTEMPTY",
            XsErrno::ENOSYS => "ENOSYS",
            XsErrno::EROFS => "EROFS",
            XsErrno::EBUSY => "EBUSY",
            XsErrno::EAGAIN => "EAGAIN",
            XsErrno::EISCONN => "EISCONN",
            XsErrno::E2BIG => "E2BIG",
            XsErrno::EPERM => "EPERM",
            XsErrno::Other => "EIO",
        }
    }

    /// Parses a wire name; unknown names map to [`XsErrno::Other`].
    pub fn from_name(name: &str) -> XsErrno {
        XsErrno::ALL.iter().copied().find(|e| e.name() == name).unwrap_or(XsErrno::Other)
    }
}

impl std::fmt::Display for XsErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
