//! The one error type of this crate.

/// A message that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the format needs.
    #[error("{what}: {got} bytes, at least {need} needed")]
    Short {
        /// What was being read.
        what: &'static str,
        /// Bytes there were.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A header's size field differs from the message's length.
    #[error("size field {claimed} but {len} bytes")]
    Size {
        /// What the header says.
        claimed: u32,
        /// What arrived.
        len: usize,
    },
    /// A malformed field.
    #[error("{0}")]
    Malformed(String),
}
